"""Recursive training on synthetic data (model collapse), with the Transformer of the
pretraining stage: generation 0 trains on real data, generation g + 1 on data its
predecessors sampled, mixed with real data as the schedule says (`SCHEDULES`).

Layout of DIR (configs/collapse.py):
  real/               the real rows (`rows`, the pool generations train on) and the fixed
                      held-out real rows (`heldout`); a text corpus's tokenizer beside them.
                      On text, `rows` holds the corpus's training documents in a seeded
                      random order (`collapse_data.seeded_order`, the run's seed), and the
                      first `selected_rows` of them (lineage: min(collapse.samples,
                      documents)) are the real rows generations train on
  gen_<g>/data.json   what generation g trains on: array-store folders and row counts
  gen_<g>/fresh/      the fresh real rows of generation g (schedule `mix` only)
  gen_<g>/model/      generation g's pretraining run (config.json, metrics.jsonl,
                      checkpoints); it resumes mid-generation like any run
  gen_<g>/samples/    `collapse.samples` rows sampled from it (lineage: generation,
                      checkpoint, temperature, schedule)
  gen_<g>/summary.json, metrics.jsonl (one line per generation, step = g)

Per generation (definitions in rlhf_jax/analysis/collapse_metrics.py): the model's
collapse/true_kl (world only), collapse/perplexity and collapse/tail_mass on the held-out
real rows; collapse/sample_* statistics (distinct_1, distinct_2, unigram_entropy,
mean_length) of its samples and collapse/data_* of the rows it trained on, with
collapse/data_rows (all of them) and collapse/data_real_rows (the real ones). Step 0 also
logs the held-out real rows' own statistics (collapse/real_*), on the world the true
model's tail mass (collapse/true_tail_mass), and on text what reading the corpus found
(data/invalid_bytes_replaced, data/skipped_files). The text tail is the rarest tokens of
the real rows generation 0 trains on, not of the whole corpus.

Several processes (one GSPMD program, stages/dispatch.MULTI_PROCESS): every process trains,
samples and measures alike on the global mesh; process 0 alone writes the real rows, the
fresh rows, the samples, data.json, the summaries and metrics.jsonl (orbax checkpoints: all
of them), and the others wait for each write at a barrier before they read it.
"""
import copy
import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import config as config_lib
from rlhf_jax import distributed, sampling, sharding
from rlhf_jax.analysis import collapse_metrics as cm
from rlhf_jax.data import array_store, collapse_data
from rlhf_jax.data.batch import from_rows
from rlhf_jax.data.collapse_data import Part
from rlhf_jax.errors import UserError
from rlhf_jax.loops import records
from rlhf_jax.stages import pretrain
from rlhf_jax.train import runs
from rlhf_jax.world import language

INITS = ('scratch', 'finetune')


def _generation_parts(schedule: str, paths: 'Paths', g: int, m: int, fraction: float, *,
                      real_rows: int) -> list:
  """`real_rows`: the selected real rows (m, or fewer when a corpus has fewer documents)."""
  if g == 0:
    return [Part(paths.real, real_rows)]
  if schedule == 'replace':
    return [Part(paths.samples(g - 1), m)]
  if schedule == 'accumulate':
    return [Part(paths.real, real_rows)] + [Part(paths.samples(k), m) for k in range(g)]
  real = round(fraction * m)  # mix
  return [p for p in (Part(paths.fresh(g), real), Part(paths.samples(g - 1), m - real)) if p.rows]


# What generation g trains on: a function of (paths, g, rows per generation, mix fraction,
# real_rows=).
SCHEDULES = {name: functools.partial(_generation_parts, name)
             for name in ('replace', 'accumulate', 'mix')}


def last_logged_step(flat: dict) -> int | None:
  """Generations 0..G-1 log one line each (step g); train.steps is each generation's."""
  g = flat.get('collapse.generations')
  return g - 1 if isinstance(g, int) else None


def resolve(config) -> None:
  c = config.collapse
  if c.schedule not in SCHEDULES:
    raise UserError(f'collapse.schedule={c.schedule!r} is not one of {tuple(SCHEDULES)}')
  if c.init not in INITS:
    raise UserError(f'collapse.init={c.init!r} is not one of {INITS}')
  if c.generations < 1 or c.samples < 1 or c.heldout_rows < 1:
    raise UserError('collapse.generations, collapse.samples and collapse.heldout_rows must '
                    'be >= 1')
  if not 0 <= c.mix_fraction <= 1:
    raise UserError(f'collapse.mix_fraction={c.mix_fraction} must be in [0, 1]')
  if c.heldout_rows < config.train.batch_size:
    raise UserError(f'collapse.heldout_rows={c.heldout_rows} is less than one batch '
                    f'(train.batch_size={config.train.batch_size})')
  if not c.temperature > 0:
    raise UserError(f'collapse.temperature={c.temperature} must be > 0')


@dataclasses.dataclass(frozen=True)
class Paths:
  workdir: str

  @property
  def real(self) -> str:
    return os.path.join(self.workdir, 'real')

  def gen(self, g: int, *names: str) -> str:
    return os.path.join(self.workdir, f'gen_{g}', *names)

  def fresh(self, g: int) -> str:
    return self.gen(g, 'fresh')

  def samples(self, g: int) -> str:
    return self.gen(g, 'samples')


def real_data(config, paths: Paths) -> tuple[collapse_data.RealData, dict]:
  """The real rows, made once into DIR/real (a text corpus's tokenizer trained there), and
  their lineage. A resumed run reads the same rows and selection back."""
  width = config.train.seq_len + 1
  c = config.collapse
  tokenizer = None
  lang = None
  if config.data.source == 'world':
    lang = language.from_block(config.world)
    make = lambda: collapse_data.world_real_data(
        lang, world_seed=config.world.seed, seed=config.seed, train_rows=c.samples,
        heldout_rows=c.heldout_rows, width=width)
  else:
    from rlhf_jax.data.sources import make_source
    source = make_source(config, workdir=paths.real + '_tokenizer')
    tokenizer = source.tokenizer

    def make():
      data = collapse_data.text_real_data(source, width=width,
                                          min_heldout=config.train.batch_size)
      order = collapse_data.seeded_order(len(data.train), seed=config.seed)
      return dataclasses.replace(data, train=data.train[order],
                                 selected_rows=min(c.samples, len(data.train)))

  def build():
    data = make()
    lineage = {'source': config.data.source, 'seed': config.seed, 'rows': len(data.train),
               'selected_rows': len(data.selected), 'heldout_rows': len(data.heldout),
               'width': width}
    if lang is None:
      lineage['selection'] = 'seeded_order(training documents, seed)[:selected_rows]'
      lineage.update({k: int(source.stats[k])
                      for k in ('invalid_bytes_replaced', 'skipped_files')})
    return {'rows': data.train, 'heldout': data.heldout}, lineage

  arrays, lineage = array_store.read_or_make(paths.real, ['rows', 'heldout'], build)
  train = np.asarray(arrays['rows'])
  # A real/ made before the selection was recorded trained on its first samples rows.
  selected = int(lineage.get('selected_rows', min(c.samples, len(train))))
  return collapse_data.RealData(train=train, heldout=np.asarray(arrays['heldout']),
                                lang=lang, tokenizer=tokenizer,
                                selected_rows=selected), lineage


def fresh_real(config, real: collapse_data.RealData, paths: Paths, g: int) -> None:
  """Generation g's fresh real rows for `mix`: new true samples on the world, rows drawn
  with replacement from the corpus's pool on text (made once)."""
  n = round(config.collapse.mix_fraction * config.collapse.samples)
  if n == 0:
    return

  def make():
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(config.seed), 0xF2E5), g)
    if real.lang is not None:
      rows = np.asarray(language.sample(real.lang, key=key, batch_size=n,
                                        seq_len=real.train.shape[1]))
    else:
      rows = real.train[np.asarray(jax.random.randint(key, (n,), 0, len(real.train)))]
    if distributed.is_primary():
      os.makedirs(paths.gen(g), exist_ok=True)
      array_store.write(paths.fresh(g), {'rows': rows},
                        lineage={'generation': g, 'real': True, 'source': config.data.source})
  distributed.make_once(paths.fresh(g), exists=os.path.isdir(paths.fresh(g)), make=make)


def generation_config(config, g: int):
  """Generation g's pretraining config: the loop's model, optimiser, training and mesh
  blocks (what it trains on is recorded in gen_<g>/data.json)."""
  sub = copy.deepcopy(config)
  with sub.unlocked():
    sub.stage = 'pretrain'
    del sub['collapse']
  return sub


def train_generation(config, real, paths: Paths, g: int) -> None:
  c = config.collapse
  parts = SCHEDULES[c.schedule](paths, g, c.samples, c.mix_fraction,
                                real_rows=len(real.selected))
  records.write_json(paths.gen(g, 'data.json'), {
      'generation': g, 'schedule': c.schedule,
      'parts': [{'path': os.path.relpath(p.path, paths.workdir), 'rows': p.rows}
                for p in parts],
      'real_rows': sum(p.rows for p in parts if p.path in (paths.real, paths.fresh(g)))})
  source = collapse_data.RowSource(
      rows=collapse_data.read_rows(parts), heldout=real.heldout, lang=real.lang,
      tokenizer=real.tokenizer, vocab_size=real.vocab_size, seed=(config.seed, g),
      batch_size=config.train.batch_size)
  sub = generation_config(config, g)
  init = None
  model_dir = paths.gen(g, 'model')
  fresh_start = not os.path.isdir(os.path.join(model_dir, 'checkpoints'))
  distributed.barrier(f'collapse: looked for generation {g} checkpoints')  # before any is made
  os.makedirs(model_dir, exist_ok=True)
  if c.init == 'finetune' and g > 0 and fresh_start:
    mesh = sharding.make_mesh(sub.mesh)
    init = runs.load(paths.gen(g - 1, 'model'), mesh=mesh, mesh_config=sub.mesh).params
  pretrain.run(sub, workdir=model_dir, source=source, init_params=init)


class Measure:
  """Samples from a generation's model and measures it on the held-out real rows."""

  def __init__(self, config, real: collapse_data.RealData):
    self.config, self.real = config, real
    self.mesh = sharding.make_mesh(config.mesh)
    v = real.vocab_size
    if real.lang is not None:
      self.true_logp = jnp.asarray(cm.true_logp_table(real.lang), jnp.float32)
      self.tail = jnp.asarray(cm.world_tail(real.lang))
    else:
      self.true_logp = None
      # The rows actually trained on: with a corpus larger than collapse.samples, the
      # rest of the pool never shapes what generation 0 learns.
      self.tail = jnp.asarray(cm.text_tail(np.asarray(cm.bigram_counts(
          jnp.asarray(real.selected), vocab_size=v))))
    self.counts = jax.jit(functools.partial(cm.bigram_counts, vocab_size=v))
    self._sums = None

  def row_stats(self, rows: np.ndarray, prefix: str) -> dict:
    stats = cm.count_statistics(self.counts(jnp.asarray(rows)), rows=len(rows))
    return {f'collapse/{prefix}_{f.name}': float(getattr(stats, f.name))
            for f in dataclasses.fields(stats)}

  def static(self) -> dict:
    out = self.row_stats(self.real.heldout, 'real')
    if self.real.lang is not None:
      heldout = self.counts(jnp.asarray(self.real.heldout))
      truth = cm.bigram_model_metrics(jnp.where(jnp.isfinite(self.true_logp), self.true_logp,
                                                -1e30),
                                      heldout_counts=heldout, true_logp=self.true_logp,
                                      tail=self.tail)
      out['collapse/true_tail_mass'] = float(truth.tail_mass)
    return out

  def model(self, loaded) -> dict:
    if self._sums is None:  # every generation has the same model: compile once
      model = loaded.model

      @jax.jit
      def sums(params, inputs, targets, segment_ids, positions):
        logits = model.apply({'params': params}, inputs, segment_ids=segment_ids,
                             positions=positions).logits
        return cm.positionwise_model_metrics(
            log_q=jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), prev=inputs,
            next=targets, true_logp=self.true_logp, tail=self.tail)
      self._sums = sums
    sums = self._sums
    total = None
    b = self.config.train.batch_size
    for lo in range(0, len(self.real.heldout) - b + 1, b):
      batch = from_rows(self.real.heldout[lo:lo + b], pad_id=language.PAD_ID)
      inputs = (batch.inputs, batch.targets, batch.segment_ids, batch.positions)
      inputs = distributed.put_global(inputs, sharding.batch_tree_sharding(
          self.mesh, self.config.mesh, inputs))
      part = distributed.to_host(sums(loaded.params, *inputs))
      total = part if total is None else jax.tree.map(np.add, total, part)
    metrics = cm.finish_positionwise(total)
    out = {'collapse/perplexity': float(metrics.perplexity),
           'collapse/tail_mass': float(metrics.tail_mass)}
    if self.true_logp is not None:
      out['collapse/true_kl'] = float(metrics.true_kl)
    return out


def sample_generation(config, paths: Paths, g: int, loaded) -> None:
  """collapse.samples rows from generation g's model (made once; process 0 writes them)."""
  distributed.make_once(paths.samples(g), exists=os.path.isdir(paths.samples(g)),
                        make=lambda: _sample(config, paths, g, loaded))


def _sample(config, paths: Paths, g: int, loaded) -> None:
  c = config.collapse
  mesh = sharding.make_mesh(config.mesh)
  sampler = sampling.Sampler(
      model=loaded.model,
      config=sampling.SampleConfig(max_new_tokens=config.train.seq_len,
                                   temperature=c.temperature),
      mesh=mesh, mesh_config=config.mesh, param_shardings=loaded.param_shardings,
      continuous_slots=c.get('continuous_slots', 0))
  prompts = np.full((c.samples, 1), language.BOS_ID, np.int32)
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(config.seed), 0x5A3F), g)
  out = sampler.sample_in_chunks(loaded.params, prompts, np.ones(c.samples, np.int32), key)
  rows = np.concatenate([prompts, out.response], axis=1).astype(np.int32)
  if not distributed.is_primary():
    return
  array_store.write(paths.samples(g), {'rows': rows}, lineage={
      'generation': g, 'model_run': paths.gen(g, 'model'), 'checkpoint': loaded.step,
      'temperature': c.temperature, 'schedule': c.schedule, 'rows': c.samples})


def run(config, *, workdir: str) -> None:
  c = config.collapse
  paths = Paths(workdir)
  # The real data first: a missing or empty corpus stops the run before config.json is
  # written (dispatch has already checked an existing config.json against this config).
  real, real_lineage = real_data(config, paths)
  config_lib.write_or_check(config, workdir)
  measure = Measure(config, real)
  read_stats = {f'data/{k}': real_lineage[k] for k in ('invalid_bytes_replaced',
                                                       'skipped_files') if k in real_lineage}
  rows = []
  for g in range(c.generations):
    print(f'collapse: generation {g}', flush=True)
    summary = paths.gen(g, 'summary.json')
    distributed.barrier(f'collapse: looked for generation {g}')  # no process decides after
    if not os.path.exists(summary):                              # another has written
      if c.schedule == 'mix' and g > 0:
        fresh_real(config, real, paths, g)
      train_generation(config, real, paths, g)
      mesh = sharding.make_mesh(config.mesh)
      loaded = runs.load(paths.gen(g, 'model'), mesh=mesh, mesh_config=config.mesh)
      with sharding.activate(mesh, config.mesh):
        sample_generation(config, paths, g, loaded)
        row = {'step': g, **(measure.static() | read_stats if g == 0 else {}),
               **measure.model(loaded)}
      spec = json.load(open(paths.gen(g, 'data.json')))
      parts = [Part(os.path.join(workdir, p['path']), p['rows']) for p in spec['parts']]
      row['collapse/data_real_rows'] = spec['real_rows']
      row.update(measure.row_stats(collapse_data.read_rows(parts), 'data'))
      samples, _ = array_store.read(paths.samples(g), ['rows'])
      row.update(measure.row_stats(np.asarray(samples['rows']), 'sample'))
      row['collapse/data_rows'] = sum(p.rows for p in parts)
      records.write_json(summary, row)
      distributed.barrier(f'collapse: summary of generation {g}')
    rows.append(json.load(open(summary)))
    records.write_metrics(workdir, rows)
  if distributed.is_primary():
    print(table(rows), flush=True)


def table(rows: list[dict]) -> str:
  cols = (('true KL', 'collapse/true_kl', '{:.4f}'), ('ppl', 'collapse/perplexity', '{:.3f}'),
          ('tail mass', 'collapse/tail_mass', '{:.4f}'),
          ('distinct-2', 'collapse/sample_distinct_2', '{:.4f}'),
          ('entropy', 'collapse/sample_unigram_entropy', '{:.3f}'),
          ('data rows', 'collapse/data_rows', '{:d}'))
  return records.table(rows, label='gen', cols=cols, width=12)
