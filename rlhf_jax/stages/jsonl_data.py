"""A stage's rows from a user's JSONL file instead of the world: `sft.data='jsonl:PATH'`
(SFT), `prefs.data='jsonl:PATH'` (reward model, DPO) or `ppo.data='jsonl:PATH'` (PPO's
rollout prompts, stages/jsonl_prompts.py); '' (the default) keeps the world.

A JSONL source needs a run on text as init.run (a pretraining run on `text:PATH`, a
stage run that learnt from JSONL itself, or an imported Hugging Face checkpoint and its
descendants): its tokenizer tokenizes the rows (data/jsonl.py). Our own tokenizer.model is
copied into DIR so that the next stage finds it too; an imported one is found through the
init.run chain. A run on the
world has no tokenizer and is refused, and so is a run on text without a JSONL source.
Without a world the evaluations scored by its gold reward and annotators are skipped, with
the reason in DIR/jsonl/lineage.json (SKIPPED) and one line on stdout; the held-out split
of the file (by prompt) gives the held-out loss or preference accuracy instead.

The tokenized rows go to DIR/jsonl once, with the file's sha256 and row counts in its
lineage; a resumed run reads them back, and refuses if the file has changed since.
Multi-process runs are refused (dispatch.check_processes): this path is not yet tested
against one process.
"""
import dataclasses
import os
import shutil

from rlhf_jax import distributed
from rlhf_jax.data import array_store, corpus, hf_tokenizer, jsonl
from rlhf_jax.data import tokenizer as tokenizer_lib
from rlhf_jax.errors import UserError

# stage -> (block, kind) of its JSONL source field `<block>.data`.
FIELDS = {'sft': ('sft', 'sft'), 'reward_model': ('prefs', 'prefs'), 'dpo': ('prefs', 'prefs'),
          'ppo': ('ppo', 'prompts')}
SKIPPED = {
    'sft': {'policy/*': 'init.run is a run on text: no world, so no gold reward or KL '
                        'by sampling on world prompts'},
    'dpo': {'policy/*': 'init.run is a run on text: no world, so no gold reward or KL '
                        'by sampling on world prompts'},
    'reward_model': {'rm/gold_*, rm/noise_ceiling, rm/group*/*, prefs/*':
                     "the file's labels come from no simulated annotator and there is no "
                     'gold reward'},
    'ppo': {'rl/gold_reward, rl/harm_rate, policy/gold_reward*, policy/group*_reward, '
            'policy/harm_rate': 'text prompts: no world, so no gold reward or forbidden '
                                'tokens; policy/* is the reward model\'s score and the KL '
                                'to the reference on held-out prompts of the file'},
}
DIRNAME = 'jsonl'


@dataclasses.dataclass(frozen=True)
class Source:
  field: str   # the config field that names it, e.g. 'sft.data'
  kind: str    # data/jsonl.KINDS
  path: str    # absolute


def source(config):
  """The stage's JSONL Source, or None (no such field for this stage, or it is '')."""
  if config.get('stage') not in FIELDS:
    return None
  block, kind = FIELDS[config.stage]
  if block not in config or not config[block].get('data', ''):
    return None
  field = f'{block}.data'
  return Source(field=field, kind=kind, path=jsonl.parse_spec(config[block].data, field=field))


def validate(config):
  """The Source (or None) after the checks that need no file: a name that parses, no other
  source of the same rows, an `overlong` choice that exists."""
  src = source(config)
  if src is None:
    return None
  block = config[src.field.split('.')[0]]
  if block.get('overlong', 'error') not in jsonl.OVERLONG:
    raise UserError(f'{src.field.split(".")[0]}.overlong={block.overlong!r} is not one of '
                    f'{jsonl.OVERLONG}')
  if src.kind == 'sft' and 'task' in config:
    raise UserError('sft.data names a JSONL file and the config has a task block: the '
                    "task's solved traces and the file are two sets of demonstrations; "
                    'choose one')
  if src.kind == 'prefs' and config.prefs.dir:
    raise UserError(f'prefs.data={config.prefs.data!r} and prefs.dir={config.prefs.dir!r} '
                    'both name preference pairs; choose one')
  if src.kind == 'prompts' and config.ppo.reward != 'rm':
    raise UserError(f'ppo.data={config.ppo.data!r} with ppo.reward={config.ppo.reward!r}: '
                    "text prompts have no gold reward, task answer or world judge; use "
                    "ppo.reward='rm'")
  if src.kind == 'prefs' and 'judge' in config:
    raise UserError('prefs.data names labelled pairs; a judge block (AI feedback) labels '
                    'pairs the stage makes itself; choose one')
  return src


def check_init_run(src: Source, init_run: str) -> str:
  """Where the init run's tokenizer is, which must exist: JSONL rows are its tokens. Its
  tokenizer.model (a run on text, or a stage run on JSONL from one), or the tokenizer/
  folder of the Hugging Face import the run descends from (data/hf_tokenizer.py)."""
  path = os.path.join(os.path.abspath(init_run), corpus.TOKENIZER_FILE)
  if os.path.exists(path):
    return path
  found = hf_tokenizer.origin(os.path.abspath(init_run))
  if found is not None and hf_tokenizer.has_tokenizer(
      os.path.join(found[0], hf_tokenizer.FOLDER)):
    return os.path.join(found[0], hf_tokenizer.FOLDER)
  raise UserError(f'{src.field} names a JSONL file, but init.run {init_run} has no '
                  f'{corpus.TOKENIZER_FILE} (a run on the world) and descends from no '
                  'imported checkpoint with a tokenizer: JSONL rows are tokenized with the '
                  'init run\'s tokenizer; start from a run on text (a pretrain with '
                  'data.source=text:PATH, a stage run on JSONL, or python -m '
                  'rlhf_jax.convert --from=hf)')


def load_tokenizer(path: str, init_run: str):
  """The tokenizer check_init_run found at `path`."""
  if os.path.isdir(path):
    return hf_tokenizer.load_for_run(os.path.abspath(init_run))
  return tokenizer_lib.load_tokenizer(model_path=path)


@dataclasses.dataclass(frozen=True)
class Given:
  """The file's rows, tokenized and checked, before the stage writes anything."""
  source: Source
  arrays: dict
  report: dict
  tokenizer_path: str


def read_given(config, *, workdir: str | None = None):
  """Given of the stage's JSONL source, or None: every bad row is refused here, before DIR
  is written or the init run's checkpoint is loaded, and so is a file that has changed
  since DIR/jsonl was made from it (`workdir`: the stage's DIR)."""
  src = validate(config)
  if src is None:
    return None
  block = src.field.split('.')[0]
  b = config[block]
  tok_path = check_init_run(src, config.init.run)
  tok = load_tokenizer(tok_path, config.init.run)
  arrays, report = jsonl.tokenize(
      src.path, kind=src.kind, tokenizer=tok, prompt_len=b.prompt_len,
      response_len=b.max_new_tokens, overlong=b.get('overlong', 'error'),
      limit_fields=(f'{block}.prompt_len', f'{block}.max_new_tokens'))
  if workdir is not None:
    _check_unchanged(os.path.join(workdir, DIRNAME), report)
  return Given(source=src, arrays=arrays, report=report, tokenizer_path=tok_path)


def _check_unchanged(directory: str, report: dict) -> None:
  if not os.path.isdir(directory):
    return
  _, old = array_store.read(directory, ())
  if old.get('sha256') != report['sha256']:
    raise UserError(f'{report["path"]} has changed since {directory} was made from it '
                    f'(sha256 {old.get("sha256", "?")[:12]}..., now '
                    f'{report["sha256"][:12]}...); restore it, or use a fresh --workdir')


def load_or_make(config, given: Given, *, workdir: str, lineage: dict):
  """(arrays, lineage) of DIR/jsonl: the given rows written there on first use (with the
  init run's tokenizer beside them in DIR), read back on a resume, whose file must be the
  one they were made from."""
  directory = os.path.join(workdir, DIRNAME)
  names = jsonl.FIELDS[given.source.kind]
  _check_unchanged(directory, given.report)
  tokenizer = os.path.join(workdir, corpus.TOKENIZER_FILE)
  # An imported checkpoint's tokenizer stays in the import run, which every run of its
  # init.run chain finds (hf_tokenizer.origin); our own sentencepiece model is copied.
  if (distributed.is_primary() and not os.path.isdir(given.tokenizer_path)
      and not os.path.exists(tokenizer)):
    shutil.copyfile(given.tokenizer_path, tokenizer + '.tmp')
    os.replace(tokenizer + '.tmp', tokenizer)
  skipped = SKIPPED[config.stage]
  record = {**given.report, **lineage, 'source_field': given.source.field,
            'skipped_evaluations': skipped}
  arrays, lineage = array_store.read_or_make(directory, names,
                                             lambda: (given.arrays, record))
  if distributed.is_primary():
    r = lineage
    print(f'{config.stage}: {r["kept"]} rows of {r["rows"]} from {r["path"]} '
          f'({r["dropped_overlong"]} dropped as too long); skipped: '
          + '; '.join(f'{k} ({v})' for k, v in skipped.items()), flush=True)
  return arrays, lineage


def static_metrics(lineage: dict, prefix: str) -> dict:
  """The file's row counts, logged once at step 0 beside the split sizes."""
  return {f'{prefix}/jsonl_rows': lineage['rows'], f'{prefix}/jsonl_kept': lineage['kept'],
          f'{prefix}/jsonl_dropped': lineage['dropped_overlong']}
