"""Config blocks shared by every stage, and the checks that run before any compute.

A config file under `configs/` composes these blocks into one `ConfigDict` and picks
sizes per variant (`tiny`, `small`, `tpu_*`). Every field is documented where it is made.
"""
import copy
import datetime
import importlib.util
import json
import os

import ml_collections

from rlhf_jax.errors import UserError

# The repository's configs/ folder, for loops and scripts that compose stage configs.
CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')


def load_file(path: str, variant: str | None = None) -> ml_collections.ConfigDict:
  """get_config(variant) of the config file at `path` (get_config() when variant is None),
  imported by path as --config=PATH[:VARIANT] does."""
  name = 'config_' + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config() if variant is None else module.get_config(variant)


def with_fields(config: ml_collections.ConfigDict, **fields) -> ml_collections.ConfigDict:
  """A copy of `config` with dotted fields set (`**{'init.run': DIR}`), new ones added: how
  a loop fills in the runs its stages start from."""
  out = copy.deepcopy(config)
  with out.unlocked():
    for dotted, value in fields.items():
      *parents, leaf = dotted.split('.')
      node = out
      for p in parents:
        node = node[p]
      node[leaf] = value
  return out


def load_named(name: str, variant: str) -> ml_collections.ConfigDict:
  """configs/<name>.py's get_config(variant)."""
  return load_file(os.path.join(CONFIGS, f'{name}.py'), variant)


def model_block() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      vocab_size=-1,           # -1: taken from the data source (world vocab or tokenizer)
      d_model=64,
      n_layers=2,
      n_heads=4,
      d_ff=256,
      mlp='swiglu',            # 'swiglu' | 'gelu' | 'geglu' (gated, tanh-GELU)
      dtype='float32',         # compute dtype: 'float32' | 'bfloat16'
      param_dtype='float32',
      rope_theta=10000.0,
      tie_embeddings=False,
      # 'xla' (einsum + softmax) | 'dot_product_attention' (jax.nn) | 'cudnn' (GPU, bf16:
      # cuDNN flash attention) | 'pallas_flash' (TPU: the Pallas flash kernel); a kernel
      # the backend lacks is refused, never replaced (models/attention_kernels.py)
      attention='xla',
      attention_block=64,      # 'xla': query block; keys after a block's end are skipped (0: off)
      remat='none',            # 'none' | 'full' | 'dots' (save matmul outputs only)
      # What released checkpoint families need (models/transformer.py); all off here.
      n_kv_heads=0,            # grouped-query attention: key/value heads (0: n_heads)
      head_dim=0,              # 0: d_model // n_heads
      norm='rms',              # 'rms' | 'layer' (LayerNorm with a bias)
      norm_eps=1e-6,
      norm_offset=0.0,         # RMSNorm scales by (norm_offset + scale); Gemma: 1
      post_norms=False,        # a norm on each sub-block's output too (Gemma 2)
      positions='rope',        # 'rope' | 'learned' (absolute, max_positions rows)
      max_positions=0,
      rope_scaling='none',     # 'none' | 'linear' | 'llama3'
      rope_factor=1.0,
      rope_low_freq_factor=1.0,
      rope_high_freq_factor=4.0,
      rope_original_max_positions=8192,
      qkv_bias=False,
      attn_out_bias=False,
      mlp_bias=False,
      qk_norm=False,           # RMSNorm over head_dim on queries and keys
      attn_softcap=0.0,        # cap * tanh(x / cap) on attention scores (0: off)
      logit_softcap=0.0,       # ... and on the output logits
      embed_scale=False,       # embeddings times sqrt(d_model)
      tied_scale=True,         # tied logits times d_model^-0.5 (released checkpoints: False)
  ))


def optim_block() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      lr=3e-3,
      warmup_steps=20,
      end_lr_ratio=0.1,        # cosine decays from lr to lr * end_lr_ratio at train.steps
      b1=0.9,
      b2=0.95,
      eps=1e-8,
      weight_decay=0.1,
      clip_norm=1.0,           # global-norm clipping; <= 0 disables
      grad_accum=1,            # microbatches per optimiser update
  ))


# Logical axis -> mesh axis. Parameters: vocab, embed, mlp, heads, kv, norm.
# Activations: batch, length, act_embed, act_heads, act_mlp, act_vocab.
DEFAULT_RULES = (
    ('batch', ('data', 'fsdp')),
    ('length', None),
    ('act_embed', None),
    ('act_heads', 'tensor'),
    ('act_mlp', 'tensor'),
    ('act_vocab', 'tensor'),
    ('vocab', 'tensor'),
    ('embed', 'fsdp'),
    ('mlp', 'tensor'),
    ('heads', 'tensor'),
    ('kv', None),
    ('norm', None),
    ('ensemble', None),        # the member axis of a reward-model ensemble
)


def mesh_block() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      data=-1,                 # -1: all devices left after the other axes
      fsdp=1,
      tensor=1,
      rules=DEFAULT_RULES,
  ))


def train_block() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      steps=300,
      batch_size=32,           # global batch, in sequences, per optimiser update
      seq_len=64,
      log_every=25,
      eval_every=50,
      eval_batches=4,
      ckpt_every=100,
      keep_ckpts=3,
      progress=True,           # tqdm bar on stderr
  ))


def data_block() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      source='world',          # 'world' | 'text:PATH' | 'tfds:NAME'
      vocab_size=1024,         # sentencepiece vocabulary for text/tfds sources
      eval_fraction=0.05,      # held-out documents for text/tfds sources
      tfds_split='train',
      tfds_eval_split='',      # '' : hold out eval_fraction of tfds_split
      tfds_data_dir='',        # '' : TFDS default data dir (never downloads)
      text_key='text',
  ))


def world_block() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      seed=0,                  # the world's own seed: runs with different `seed` share a world
      vocab_size=64,
      branching=8,
      zipf_a=1.1,
      eos_prob=0.05,
  ))


def init_block() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      run='',                  # the earlier run this stage starts from (its DIR)
      step=-1,                 # its checkpoint to load; -1: the newest
  ))


def lora_block() -> ml_collections.ConfigDict:
  """Low-rank adapters (docs/lora.md): a stage's own training choice, so a top-level block
  and not part of `model`, which every stage copies from its init run (runs.adopt) and
  which describes the weights a run's checkpoint loads as."""
  return ml_collections.ConfigDict(dict(
      rank=0,                  # adapter rank r; 0: off (the base trains whole)
      alpha=16.0,              # the adapters' output is scaled by alpha / rank
      targets='query,value',   # comma-separated kernels: query key value out gate_up up down
  ))


# The stages that train with `lora` (single-stage runs, or stages of a pipeline).
LORA_STAGES = ('sft', 'reward_model', 'dpo', 'ppo')


def validate_lora(config: ml_collections.ConfigDict) -> None:
  """The lora block, if the config has one; what the model lacks is checked once the model
  is known (stages/from_run.py resolve)."""
  if 'lora' not in config:
    return
  from rlhf_jax.models.lora import TARGETS, targets_of  # lazily: this module imports no jax
  block = config.lora
  if not isinstance(block.rank, int) or block.rank < 0:
    raise UserError(f'lora.rank={block.rank} must be an integer >= 0 (0: off)')
  if block.rank == 0:
    return
  if config.get('stage') not in LORA_STAGES:
    raise UserError(f'lora.rank={block.rank}: stage {config.get("stage")!r} does not train '
                    f'with adapters (only {", ".join(LORA_STAGES)} do)')
  if not block.alpha > 0:
    raise UserError(f'lora.alpha={block.alpha} must be positive')
  targets = targets_of(block)
  unknown = [t for t in targets if t not in TARGETS]
  if unknown or not targets:
    what = f'unknown kernel {unknown[0]!r}' if unknown else 'names no kernel'
    raise UserError(f'lora.targets={block.targets!r}: {what}; choose from {", ".join(TARGETS)}')
  if len(set(targets)) != len(targets):
    raise UserError(f'lora.targets={block.targets!r} names a kernel twice')


def reward_block() -> ml_collections.ConfigDict:
  """The world's gold reward (rlhf_jax/world/reward.py)."""
  return ml_collections.ConfigDict(dict(
      seed=1,
      topic=1.0,               # weight of the prompt-response topic cosine
      length=0.0,              # gold reward per response token
      harm=2.0,                # penalty for a response holding a forbidden token
      num_harmful=3,
      topic_dim=8,
  ))


def annotators_block() -> ml_collections.ConfigDict:
  """The simulated labellers (rlhf_jax/world/annotators.py)."""
  return ml_collections.ConfigDict(dict(
      seed=2,
      num=16,
      minority_fraction=0.25,  # the last quarter of the pool is the minority group
      minority_corr=0.3,       # correlation of the minority's helpfulness weights with gold
      length_bias=0.0,         # mean per-token liking for length (reward-hacking bait)
      length_bias_spread=0.0,
      temperature=0.1,         # Bradley-Terry noise; 0: always the better response
      temperature_spread=0.0,
      unreliable_fraction=0.0,      # a seeded random share of the pool labels badly:
      unreliable_temperature=10.0,  # with this temperature (10: near coin flips)
      unreliable_flip=False,        # and, if True, preferring the worse response
  ))


def prefs_block() -> ml_collections.ConfigDict:
  """Preference pairs: read from `dir`, or made from the init run's policy into
  DIR/preferences (the same seed and policy give the same set)."""
  return ml_collections.ConfigDict(dict(
      dir='',                  # an existing preference set (DIR[,DIR...]); '': make one
      num_prompts=1024,
      responses_per_prompt=4,  # k: every pair of the k responses to a prompt is labelled
      prompt_len=8,            # BOS and up to prompt_len - 1 tokens of a true sequence
      max_new_tokens=48,
      temperature=1.0,
      continuous_slots=0,      # 0: the static sampler; > 0 (a multiple of the data-parallel
                               # size): continuous batching through that many cache rows,
                               # with row keys (SampleConfig.row_keys): other tokens than 0's
      round=0,                 # recorded in the lineage; rounds > 0 draw fresh prompts
      eval_fraction=0.1,       # prompts held out, with all their pairs
      labels_per_pair=1,       # distinct annotators who each label every pair
      aggregate='single',      # their labels -> one: 'single' (labels_per_pair=1 only) |
                               # 'majority' (soft label: vote share) | 'consistency'
                               # (one-coin Dawid-Skene EM; soft label: its posterior)
  ))


def jsonl_prefs_fields() -> dict:
  """The prefs fields of the stages that can learn from a user's preference file (the
  reward model, DPO; stages/jsonl_data.py)."""
  return dict(
      data='',                 # '': pairs of the world (dir, or made); 'jsonl:PATH': a local
                               # file of {"prompt", "chosen", "rejected"} rows (data/jsonl.py),
                               # init.run a run on text; prompt_len / max_new_tokens bound
                               # the prompt and each response, in tokens
      overlong='error',        # jsonl: a row over those bounds is an 'error' | 'drop' (left
                               # out, counted in DIR/jsonl's lineage)
  )


def policy_eval_block() -> ml_collections.ConfigDict:
  """Sampling-based policy evaluation: gold reward and KL to the reference on fixed
  world prompts, at temperature 1."""
  return ml_collections.ConfigDict(dict(
      num_prompts=256,
      prompt_len=8,
      max_new_tokens=48,
  ))


def task_block() -> ml_collections.ConfigDict:
  """A task whose answers a program checks (rlhf_jax/tasks/). Each field is read by the
  tasks named beside it. The world tasks take the world's top two ids for themselves
  (vocab_size - 1: answer marker, vocab_size - 2: separator) and write a value v as the
  token 3 + v. The defaults fit the tiny world (vocab 64): prompts of 7 / 9 / 12 tokens
  and solved traces of 8 / 10 / 4 (sum_mod / sort / lookup). SFT of the tiny 2-layer
  d_model-64 model on 400 solved traces, held-out greedy pass@1 (one seed; chance in
  brackets): sum_mod 0.84 (0.14), sort 0.86; lookup 0.31 (0.25), 0.38 from 1000 traces:
  its table needs an induction-like circuit that few traces do not teach."""
  return ml_collections.ConfigDict(dict(
      name='sum_mod',          # world: 'sum_mod' | 'sort' | 'lookup'
      partial_credit=0.0,      # a wrong multi-token answer (sort) scores this x its share of
                               # positions right; 0: off (1/0 reward)
      num_operands=6,          # sum_mod, sort: values in the prompt
      modulus=7,               # sum_mod: values in [0, modulus); answer: their sum mod it
      num_values=10,           # sort: values in [0, num_values), repeats allowed
      table_size=4,            # lookup: key -> key pairs in the prompt (one cycle)
      num_symbols=8,           # lookup: keys drawn from [0, num_symbols)
      max_hops=2,              # lookup: hops drawn from [1, max_hops]; trace: the hops' keys
      # text (tasks/text_tasks.py): 'arithmetic_text' | 'jsonl', in the init run's tokens
      match='exact',           # text: 'exact' (the answer's tokens) | 'numeric' (its value)
      marker='####',           # text: the answer marker, GSM8K's
      answer_width=0,          # text: most answer tokens; 0: from the answers (numeric: +4)
      num_terms=2,             # arithmetic_text: operands per problem, left to right
      min_operand=0,           # arithmetic_text: operands drawn from [min, max]
      max_operand=99,
      ops='+-',                # arithmetic_text: operators drawn from these ('+-*')
      path='',                 # jsonl: a local file of {"prompt", "answer"} lines
      prompt_len=64,           # jsonl: prompt width, BOS included; a longer prompt: error
  ))


def feedback_config(stage: str) -> ml_collections.ConfigDict:
  """base_config plus the blocks of the stages that learn from the world's feedback."""
  config = base_config(stage)
  config.init = init_block()
  config.reward = reward_block()
  config.annotators = annotators_block()
  config.policy_eval = policy_eval_block()
  if stage in LORA_STAGES:
    config.lora = lora_block()
  return config


def base_config(stage: str) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      stage=stage,
      seed=0,
      model=model_block(),
      optim=optim_block(),
      mesh=mesh_block(),
      train=train_block(),
      data=data_block(),
      world=world_block(),
  ))


def _validate_dpo(d) -> None:
  from rlhf_jax.train.preference_losses import LOSSES  # lazily: this module imports no jax
  if d.loss not in LOSSES:
    raise UserError(f'dpo.loss={d.loss!r} is not one of {tuple(LOSSES)}')
  for name in ('beta', 'tau', 'desirable_weight', 'undesirable_weight'):
    if not d[name] > 0:
      raise UserError(f'dpo.{name}={d[name]} must be positive')
  if not 0 <= d.epsilon < 0.5:
    raise UserError(f'dpo.epsilon={d.epsilon} must be in [0, 0.5) (a label-flip rate; '
                    'robust_dpo divides by 1 - 2 epsilon)')
  for name in ('gamma', 'orpo_lambda'):
    if d[name] < 0:
      raise UserError(f'dpo.{name}={d[name]} must be >= 0')


def _validate_distill(d) -> None:
  from rlhf_jax.train.distill_losses import LOSSES  # lazily: this module imports no jax
  if d.loss not in LOSSES:
    raise UserError(f'distill.loss={d.loss!r} is not one of {tuple(LOSSES)}')
  if d.data not in ('world', 'teacher'):
    raise UserError(f"distill.data={d.data!r} is not one of ('world', 'teacher')")
  if d.loss == 'seq_kd' and d.data != 'teacher':
    raise UserError("distill.loss='seq_kd' trains on the teacher's samples: set "
                    "distill.data='teacher' (on the world's own sequences it is 'ce')")
  if d.loss == 'ce' and d.data != 'world':
    raise UserError("distill.loss='ce' is the no-teacher baseline on the world's true "
                    "sequences: set distill.data='world' (on teacher samples it is 'seq_kd')")
  if d.on_policy_fraction > 0 and not LOSSES[d.loss].on_policy_ok:
    raise UserError(f'distill.on_policy_fraction={d.on_policy_fraction}: {d.loss!r} learns '
                    "from given tokens only; the student's own samples need a divergence "
                    "(kd, reverse_kl or gkd)")
  if d.on_policy_fraction > 0 and d.loss == 'kd' and d.alpha < 1:
    raise UserError(f'distill.alpha={d.alpha} with on_policy_fraction > 0: kd\'s hard-label '
                    "term would be a cross-entropy on the student's own samples; use "
                    'alpha=1 on-policy')
  for name in ('alpha', 'beta', 'on_policy_fraction'):
    if not 0 <= d[name] <= 1:
      raise UserError(f'distill.{name}={d[name]} must be in [0, 1]')
  for name in ('temperature', 'sample_temperature'):
    if not d[name] > 0:
      raise UserError(f'distill.{name}={d[name]} must be > 0')
  for name in ('max_new_tokens', 'eval_prompts', 'num_prompts', 'prompt_len'):
    if d[name] <= 0:
      raise UserError(f'distill.{name}={d[name]} must be positive')
  if d.teacher_top_k < 0:
    raise UserError(f'distill.teacher_top_k={d.teacher_top_k} must be >= 0 (0: all logits)')


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks that need no devices and no data; raises UserError naming the field. A
  multi-stage config (`stages`) is checked stage by stage."""
  if 'stages' in config:
    for name, stage in config.stages.items():
      try:
        validate(stage)
      except UserError as e:
        raise UserError(f'stages.{name}: {e}') from None
      if 'lora' in stage and stage.lora.rank > 0 and config.get('stage') != 'pipeline':
        # Other loops build their own states and steps from a stage's parts.
        raise UserError(f'stages.{name}.lora.rank={stage.lora.rank}: the {config.get("stage")!r} '
                        'loop does not train with adapters (a pipeline\'s stages do)')
    return
  if 'model' not in config:
    return  # no language model (self-play): the stage's resolve() checks its own blocks
  m, t, o = config.model, config.train, config.optim
  validate_model(m, seq_len=t.seq_len)
  validate_lora(config)
  for name in ('steps', 'batch_size', 'seq_len', 'log_every', 'eval_every', 'ckpt_every',
               'keep_ckpts'):
    if t[name] <= 0:
      raise UserError(f'train.{name}={t[name]} must be positive')
  if o.grad_accum <= 0 or t.batch_size % o.grad_accum:
    raise UserError(f'train.batch_size={t.batch_size} is not divisible by '
                    f'optim.grad_accum={o.grad_accum}')
  if o.lr <= 0:
    raise UserError(f'optim.lr={o.lr} must be positive')
  source = config.data.source
  if not (source == 'world' or source.startswith('text:') or source.startswith('tfds:')):
    raise UserError(f"data.source={source!r} is not one of 'world', 'text:PATH', 'tfds:NAME'")
  if source.partition(':')[2] == '' and source != 'world':
    raise UserError(f'data.source={source!r} names no path or dataset after the colon')
  for block in CONTINUOUS_BLOCKS:
    if block in config:
      check_continuous_slots(f'{block}.continuous_slots',
                             config[block].get('continuous_slots', 0))
  # A task block is checked by the stage's resolve(), against the world of its init run.
  if 'distill' in config:
    _validate_distill(config.distill)
  if 'init' in config:
    _validate_feedback(config)


# The blocks whose sampling takes a continuous_slots field (sampling.Sampler's).
CONTINUOUS_BLOCKS = ('prefs', 'ppo', 'collapse')


def check_continuous_slots(name: str, slots, dp: int = 1) -> None:
  """A continuous_slots field: 0 (the static sampler) or a positive multiple of the
  data-parallel size `dp` (1 where the mesh is not built yet)."""
  if not isinstance(slots, int) or slots < 0 or slots % dp:
    raise UserError(f'{name}={slots!r} must be 0 (the static sampler) or a positive '
                    f'multiple of the data-parallel size {dp} (continuous batching through '
                    'that many cache rows)')


def _validate_feedback(config: ml_collections.ConfigDict) -> None:
  if config.data.source != 'world':
    raise UserError(f'stage {config.stage!r} learns from the world\'s gold reward and '
                    f'annotators: data.source must be \'world\', not {config.data.source!r}')
  if not config.init.run:
    raise UserError('init.run is empty: name the run directory this stage starts from')
  a = config.annotators
  if a.num <= 0 or not 0 <= a.minority_fraction < 1 or a.temperature < 0:
    raise UserError('annotators: num must be positive, minority_fraction in [0, 1), '
                    'temperature >= 0')
  if not 0 <= a.unreliable_fraction <= 1 or a.unreliable_temperature < 0:
    raise UserError(f'annotators.unreliable_fraction={a.unreliable_fraction} must be in '
                    f'[0, 1] and annotators.unreliable_temperature='
                    f'{a.unreliable_temperature} >= 0')
  for block in ('prefs', 'policy_eval', 'sft', 'ppo'):
    if block not in config:
      continue
    b = config[block]
    for name in ('num_prompts', 'max_new_tokens'):
      if b[name] <= 0:
        raise UserError(f'{block}.{name}={b[name]} must be positive')
    if b.prompt_len < 2:
      raise UserError(f'{block}.prompt_len={b.prompt_len} must be >= 2 (BOS and a token)')
  if 'sft' in config and config.sft.samples_per_prompt < 1:
    raise UserError(f'sft.samples_per_prompt={config.sft.samples_per_prompt} must be >= 1')
  if 'rm' in config and config.rm.ensemble < 1:
    raise UserError(f'rm.ensemble={config.rm.ensemble} must be >= 1')
  if 'rm' in config and config.rm.pooling not in ('last', 'mean'):
    raise UserError(f"rm.pooling={config.rm.pooling!r} is not one of ('last', 'mean')")
  if 'dpo' in config:
    _validate_dpo(config.dpo)
  if 'ppo' in config:
    _validate_ppo(config)
  if 'grpo' in config and config.grpo.get('data', ''):
    raise UserError(f'grpo.data={config.grpo.data!r}: GRPO scores each rollout with a '
                    "task's verifier, and {\"prompt\"} rows carry no answer to check it "
                    "against; give {\"prompt\", \"answer\"} problems as task.name='jsonl' "
                    "task.path=PATH, or run PPO against a reward model (ppo.data)")
  if 'prefs' in config:
    p = config.prefs
    if p.responses_per_prompt < 2:
      raise UserError(f'prefs.responses_per_prompt={p.responses_per_prompt}: a pair needs '
                      'at least 2 responses per prompt')
    if not 0 < p.eval_fraction < 1:
      raise UserError(f'prefs.eval_fraction={p.eval_fraction} must be in (0, 1)')
    if not p.temperature > 0:
      raise UserError(f'prefs.temperature={p.temperature} must be > 0')
    aggregates = ('single', 'majority', 'consistency')  # data/preferences.py AGGREGATES
    if p.aggregate not in aggregates:
      raise UserError(f'prefs.aggregate={p.aggregate!r} is not one of {aggregates}')
    if not 1 <= p.labels_per_pair <= a.num:
      raise UserError(f'prefs.labels_per_pair={p.labels_per_pair} must be in [1, '
                      f'annotators.num={a.num}]: each label is a different annotator\'s')
    if p.aggregate == 'single' and p.labels_per_pair != 1:
      raise UserError(f"prefs.aggregate='single' keeps one label but prefs.labels_per_pair="
                      f"{p.labels_per_pair}: choose 'majority' or 'consistency'")


# model.attention; the accelerator kernels are in models/attention_kernels.py.
ATTENTIONS = ('xla', 'dot_product_attention', 'cudnn', 'pallas_flash')


def validate_model(m: ml_collections.ConfigDict, *, seq_len: int) -> None:
  """The model block; a field a run written before it existed lacks takes its default
  (ModelConfig.from_config), so it is read with .get here."""
  defaults = model_block()
  get = lambda name: m.get(name, defaults[name])
  head_dim, kv_heads = get('head_dim'), get('n_kv_heads')
  if head_dim < 0 or kv_heads < 0:
    raise UserError(f'model.head_dim={head_dim} and model.n_kv_heads={kv_heads} must be '
                    '>= 0 (0: derived from d_model and n_heads)')
  if not head_dim and m.d_model % m.n_heads:
    raise UserError(f'model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}')
  if kv_heads and m.n_heads % kv_heads:
    raise UserError(f'model.n_heads={m.n_heads} is not divisible by model.n_kv_heads='
                    f'{kv_heads}: each key/value head serves a whole group of query heads')
  if get('positions') == 'rope' and (head_dim or m.d_model // m.n_heads) % 2:
    raise UserError('model.d_model / model.n_heads (or model.head_dim) must be even for '
                    'rotary embeddings')
  for name, choices in (('mlp', ('swiglu', 'gelu', 'geglu')),
                        ('dtype', ('float32', 'bfloat16')),
                        ('param_dtype', ('float32', 'bfloat16')),
                        ('attention', ATTENTIONS),
                        ('remat', ('none', 'full', 'dots')), ('norm', ('rms', 'layer')),
                        ('positions', ('rope', 'learned')),
                        ('rope_scaling', ('none', 'linear', 'llama3'))):
    if get(name) not in choices:
      raise UserError(f'model.{name}={get(name)!r} is not one of {choices}')
  if m.attention_block < 0:
    raise UserError(f'model.attention_block={m.attention_block} must be >= 0 (0: no blocks)')
  if get('norm_eps') <= 0:
    raise UserError(f'model.norm_eps={get("norm_eps")} must be positive')
  if get('positions') == 'learned' and not 0 < seq_len <= get('max_positions'):
    raise UserError(f'model.positions=\'learned\' has model.max_positions='
                    f'{get("max_positions")} rows; train.seq_len={seq_len} needs at least as '
                    'many')
  if get('rope_scaling') != 'none' and get('rope_factor') <= 0:
    raise UserError(f'model.rope_factor={get("rope_factor")} must be positive')
  if get('rope_scaling') == 'llama3' and not (
      get('rope_high_freq_factor') > get('rope_low_freq_factor') > 0):
    raise UserError('model.rope_scaling=\'llama3\' needs rope_high_freq_factor > '
                    'rope_low_freq_factor > 0')
  for name in ('attn_softcap', 'logit_softcap'):
    if get(name) < 0:
      raise UserError(f'model.{name}={get(name)} must be >= 0 (0: off)')
  if get('attn_softcap') and m.attention != 'xla':
    raise UserError(f"model.attn_softcap needs model.attention='xla': {m.attention!r} has no "
                    'soft-capping')
  if m.attention == 'cudnn':
    h = head_dim or m.d_model // m.n_heads
    if get('dtype') != 'bfloat16':
      raise UserError(f"model.attention='cudnn' needs model.dtype='bfloat16' (cuDNN flash "
                      f"attention takes fp16/bf16 only), not {get('dtype')!r}")
    if h % 8 or h > 256:
      raise UserError(f"model.attention='cudnn' needs a head dim that is a multiple of 8 "
                      f'and at most 256; this model has {h}')


def _validate_ppo(config: ml_collections.ConfigDict) -> None:
  p = config.ppo
  if p.get('data', '') and p.reward != 'rm':
    raise UserError(f'ppo.data={p.data!r} with ppo.reward={p.reward!r}: text prompts have '
                    "no gold reward, task answer or world judge; use ppo.reward='rm' (a "
                    'reward_model run on the same tokenizer as ppo.rm_run)')
  if p.get('data', '') and not 0 < p.eval_fraction < 1:
    raise UserError(f'ppo.eval_fraction={p.eval_fraction} must be in (0, 1)')
  for name, choices in (('reward', ('rm', 'gold', 'task', 'judge')),
                        ('value', ('head', 'critic')), ('kl_control', ('fixed', 'adaptive')),
                        ('reward_norm', ('mean', 'mean_std'))):
    if p[name] not in choices:
      raise UserError(f'ppo.{name}={p[name]!r} is not one of {choices}')
  if p.reward_norm_prompts < 2:
    raise UserError(f'ppo.reward_norm_prompts={p.reward_norm_prompts}: the reward '
                    'statistics need at least 2 reference samples')
  if p.reward == 'rm' and not p.rm_run:
    raise UserError("ppo.rm_run is empty: name the reward_model run (or set ppo.reward='gold')")
  if p.reward == 'task':
    if 'task' not in config or 'eval_prompts' not in p or 'eval_samples' not in p:
      raise UserError("ppo.reward='task' needs a task block and ppo.eval_prompts and "
                      'ppo.eval_samples, which this config file lacks; configs/ppo.py:'
                      'task_tiny has them')
    for name in ('eval_prompts', 'eval_samples'):
      if p[name] <= 0:
        raise UserError(f'ppo.{name}={p[name]} must be positive')
  if p.epochs < 1 or p.minibatches < 1:
    raise UserError(f'ppo.epochs={p.epochs} and ppo.minibatches={p.minibatches} must be >= 1')
  if config.train.batch_size % p.minibatches:
    raise UserError(f'train.batch_size={config.train.batch_size} rollouts are not divisible '
                    f'into ppo.minibatches={p.minibatches}')
  if not (p.clip > 0 and p.value_clip > 0):
    raise UserError(f'ppo.clip={p.clip} and ppo.value_clip={p.value_clip} must be positive')
  if not (0 < p.gamma <= 1 and 0 <= p.lam <= 1):
    raise UserError(f'ppo.gamma={p.gamma} must be in (0, 1] and ppo.lam={p.lam} in [0, 1]')
  if p.kl_coef < 0 or not (p.kl_target > 0 and p.kl_horizon > 0):
    raise UserError(f'ppo.kl_coef={p.kl_coef} must be >= 0, ppo.kl_target and '
                    'ppo.kl_horizon positive')
  if p.num_prompts < config.train.batch_size:
    raise UserError(f'ppo.num_prompts={p.num_prompts} is smaller than one batch of '
                    f'{config.train.batch_size} rollouts')
  if p.get('continuous_slots', 0) > config.train.batch_size:
    raise UserError(f'ppo.continuous_slots={p.continuous_slots} is more cache rows than the '
                    f'train.batch_size={config.train.batch_size} rollouts of a step; use '
                    'fewer (or 0: the static sampler over the batch)')


def to_dict(config: ml_collections.ConfigDict) -> dict:
  return json.loads(config.to_json_best_effort(sort_keys=True))


# Fields that may differ when a run is resumed: how often it reports or shows progress
# does not change what it computes. Self-play may be given more iterations: its learning
# rate is constant, so the ones done stand.
RESUMABLE_FIELDS = ('train.log_every', 'train.progress', 'selfplay.iterations')
# Also resumable in a single-stage run (a module under rlhf_jax/stages/), which then continues
# from its newest checkpoint: its length (the LR schedule then decays to the new end; the
# steps done stand as they were computed), how often it evaluates and checkpoints, and how
# many checkpoints it keeps from the next save on. In a loop the train block is that of each
# generation or iteration, which later ones build on, so it stays fixed.
SINGLE_STAGE_RESUMABLE_FIELDS = ('train.steps', 'train.eval_every', 'train.ckpt_every',
                                 'train.keep_ckpts')
# Length fields, counted in the unit of the run's checkpoint steps, and how far past the
# newest checkpoint a changed one must reach (it continues a run, never undoes any of it): a
# train loop evaluates at its last step, which it cannot do at one it does not compute;
# self-play evaluates its last iteration from the parameters it saved.
LENGTH_FIELDS = {'train.steps': 1, 'selfplay.iterations': 0}
# Changes not worth a line in DIR/config_history.jsonl: they only show progress differently.
UNRECORDED_FIELDS = ('train.progress',)
# Fields left at -1 in the config file and filled in by the run.
UNRESOLVED = ('model.vocab_size',)
# Fields added after runs were written, with the value such a run (whose config.json lacks
# them) ran with: absent there and at this value here, they do not make the config differ.
ADDED_FIELDS = {'lora.rank': 0, 'lora.alpha': 16.0, 'lora.targets': 'query,value',
                'prefs.continuous_slots': 0, 'ppo.continuous_slots': 0,
                'collapse.continuous_slots': 0}


def flatten(d: dict, prefix: str = '') -> dict:
  """A nested config dict as {'a.b.c': value}."""
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(flatten(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def _resumable_fields(flat: dict) -> tuple:
  from rlhf_jax.stages import dispatch  # late: dispatch imports this module
  module = dispatch.STAGES.get(flat.get('stage'), '')
  single = module.startswith('rlhf_jax.stages.') and not any(k.startswith('stages.')
                                                             for k in flat)
  return RESUMABLE_FIELDS + (SINGLE_STAGE_RESUMABLE_FIELDS if single else ())


def newest_checkpoint(workdir: str) -> int | None:
  """The newest step in DIR/checkpoints/ (orbax names each finished one by its step)."""
  try:
    steps = [int(n) for n in os.listdir(os.path.join(workdir, 'checkpoints')) if n.isdigit()]
  except OSError:
    return None
  return max(steps, default=None)


def _change_line(workdir: str, changes: dict, from_step: int | None, flat: dict) -> str:
  parts = [f'{k} {v["old"]} -> {v["new"]}' for k, v in changes.items()]
  if 'train.steps' in changes:
    end = changes['train.steps']['new']
    if flat.get('stage') == 'ppo':
      end = (f'{end} x ppo.epochs x ppo.minibatches = '
             f'{end * flat["ppo.epochs"] * flat["ppo.minibatches"]} updates')
    parts[list(changes).index('train.steps')] += (
        f' (the learning-rate schedule now runs to the new end, {end})')
  where = 'from its start' if from_step is None else f'from checkpoint {from_step}'
  return (f'config: {workdir} continues {where} with {"; ".join(parts)} '
          '(recorded in config_history.jsonl)')


def write_or_check(config: ml_collections.ConfigDict, workdir: str, *,
                   write: bool = True) -> None:
  """Checks that an existing DIR/config.json describes the same run, then (re)writes it.

  Called once before any compute with write=False (fields the run resolves later, such as
  model.vocab_size = -1, match anything), and again with the resolved config. Resumable
  fields (`_resumable_fields`) may differ: the run continues from its newest checkpoint under
  the new values; with write=True, process 0 appends the change to DIR/config_history.jsonl
  (time, the checkpoint continued from, old and new values) and says so in one line."""
  path = os.path.join(workdir, 'config.json')
  new = to_dict(config)
  changes, from_step = {}, None
  if os.path.exists(path):
    try:
      with open(path) as f:
        old = json.load(f)
    except (OSError, ValueError) as e:
      raise UserError(f'{path} is unreadable ({e}); use a fresh --workdir') from None
    a, b = flatten(old), flatten(new)
    resumable = _resumable_fields(b)
    differ = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k)
                    and not (k in UNRESOLVED and b.get(k) == -1)
                    and not (k not in a and k in ADDED_FIELDS and b.get(k) == ADDED_FIELDS[k]))
    diff = [k for k in differ if k not in resumable]
    if diff:
      raise UserError(f'{workdir} holds a run with a different config (differs at: '
                      f'{", ".join(diff[:5])}); use a fresh --workdir or the same overrides')
    from_step = newest_checkpoint(workdir)
    for k in differ:
      if k in LENGTH_FIELDS and from_step is not None and b[k] < from_step + LENGTH_FIELDS[k]:
        least = from_step + LENGTH_FIELDS[k]
        raise UserError(f'{k}={b[k]} does not continue the run in {workdir} past its newest '
                        f'checkpoint (step {from_step}); a run is continued, never undone: '
                        f'choose {k} >= {least}, or a fresh --workdir')
    changes = {k: {'old': a.get(k), 'new': b.get(k)} for k in differ
               if k not in UNRECORDED_FIELDS}
  import jax
  if not write or jax.process_index() != 0:  # one writer; every process has checked
    return
  if changes:
    # Before config.json: a run stopped between the two records the change twice, never
    # not at all.
    record = {'time': datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec='seconds'), 'from_step': from_step, 'changes': changes}
    with open(os.path.join(workdir, 'config_history.jsonl'), 'a') as f:
      f.write(json.dumps(record, sort_keys=True) + '\n')
    print(_change_line(workdir, changes, from_step, flatten(new)), flush=True)
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(new, f, indent=2, sort_keys=True)
  os.replace(tmp, path)
