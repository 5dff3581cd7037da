r"""Labels per pair at equal label cost: a reward model's gold agreement when a budget of
--budget labels buys budget/k pairs with k labels each, aggregated by majority vote or by
consistency weighting, from an annotator pool with planted unreliable members.

  python experiments/annotator_aggregation.py --out=runs/annotator_aggregation \
    [--sft_run=runs/sft_tiny] [--seeds=3] [--labels=1,3,5] [--budget=1200]

Without --sft_run (or if it names no run), configs/pretrain.py:tiny and configs/sft.py:tiny
are trained first into OUT/pretrain and OUT/sft. Per seed, configs/reward_model.py:tiny
makes a pool of preference pairs from the SFT policy (--pool_prompts prompts x 6 pairs, in
OUT/seed<s>/preferences, made once) in which every pair holds max(--labels) labels by
distinct annotators of a 16-annotator pool whose --unreliable_fraction (seeded, random) label
with temperature --unreliable_temperature and, with --flip (the default), prefer the worse
response. Then for each k in --labels and each aggregate (majority: soft label the vote
share; consistency: one-coin Dawid-Skene EM over the labels bought, soft label its
posterior) the first budget/k training pairs of a seeded order keep their first k labels
(a uniform draw of k distinct annotators), the aggregate is recomputed from them
(data/preferences.py `aggregate`), and a one-member reward model is trained from the SFT
init for --steps steps of 64 pairs on the soft labels. Its gold agreement
(rm/gold_accuracy) is measured on the seed's held-out prompts' pairs (--eval_fraction),
the same pairs for every k and aggregate; next to it, the labels' own gold agreement
(prefs/aggregate_gold_agreement of the pairs bought). k = 1 is a single hard label for
majority and nearly so for consistency (its posterior for one label is the annotator's
estimated accuracy). Seeds differ in prompts, responses, labels and minibatch order; the
reward head's init is the same.

Each finished training is recorded in OUT/records.jsonl, so a killed run rerun with the same
command continues (trainings are seeded by (seed, k, aggregate) and repeat exactly); other
settings on the same OUT are refused. Writes OUT/annotator_aggregation.csv, prints a table
(mean +- 1.96 std / sqrt(seeds)) and, last, a JSON line. Runtime on a shared 2-core CPU
with the defaults: 14 minutes given an SFT run (18 trainings of 150 steps, 30-70 s each),
about 2 more to train the chain; --seeds=1 about 5 minutes.

Measured with the defaults (3 seeds, budget 1200 labels, 4 of 16 annotators adversarial):
the labels' gold agreement rises with k far more under consistency weighting (k=1 0.666;
k=3 majority 0.743 vs consistency 0.905; k=5 0.772 vs 0.925), but the reward model's does
not follow: 0.60 at k=1, 0.63 at k=3 for both aggregates, 0.59 at k=5 (+- 0.01-0.04). At
this budget the tiny reward model, far below its labels' quality, is limited by the
number of pairs; cleaner labels on 240-400 pairs do not make up for it.
"""
import csv
import json
import os
import sys
import time

from absl import app, flags, logging
import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import config as config_lib
from rlhf_jax import sharding
from rlhf_jax.data import preferences
from rlhf_jax.data.row_source import split_by_prompt
from rlhf_jax.errors import UserError
from rlhf_jax.stages import dispatch, from_run, preference_data, reward_eval, reward_model
from rlhf_jax.train import reward_step

_SFT = flags.DEFINE_string('sft_run', '', "SFT run the reward models start from ('': train "
                           'the tiny chain into OUT).')
_OUT = flags.DEFINE_string('out', 'runs/annotator_aggregation', 'Output directory.')
_SEEDS = flags.DEFINE_integer('seeds', 3, 'Seeds.')
_LABELS = flags.DEFINE_list('labels', ['1', '3', '5'], 'Labels per pair k.')
_BUDGET = flags.DEFINE_integer('budget', 1200, 'Labels bought per training (budget/k pairs).')
_STEPS = flags.DEFINE_integer('steps', 150, 'Train steps per reward model.')
_POOL = flags.DEFINE_integer('pool_prompts', 320, 'Prompts per seed (6 pairs each).')
_EVAL = flags.DEFINE_float('eval_fraction', 0.2, 'Prompts held out, with all their pairs.')
_FRACTION = flags.DEFINE_float('unreliable_fraction', 0.25, 'Share of unreliable annotators.')
_TEMPERATURE = flags.DEFINE_float('unreliable_temperature', 0.1,
                                  "The unreliable annotators' Bradley-Terry temperature.")
_FLIP = flags.DEFINE_bool('flip', True, 'Unreliable annotators prefer the worse response.')
METHODS = ('majority', 'consistency')
SCORE_BATCH = 256  # pairs per forward when scoring (one compiled shape)


def labels_per_pair() -> list[int]:
  try:
    ks = sorted({int(k) for k in _LABELS.value})
  except ValueError:
    raise UserError(f'--labels={",".join(_LABELS.value)} must be integers') from None
  if not ks or ks[0] < 1 or ks[-1] > 16:
    raise UserError('--labels must be in [1, 16] (the pool has 16 annotators)')
  if _BUDGET.value // ks[-1] < 1:
    raise UserError(f'--budget={_BUDGET.value} buys no pair at {ks[-1]} labels per pair')
  return ks


def sft_run(out: str) -> str:
  """--sft_run, or the tiny pretrain -> SFT chain in OUT (each stage resumes)."""
  if _SFT.value:
    return os.path.abspath(_SFT.value)
  dirs = {name: os.path.abspath(os.path.join(out, name)) for name in ('pretrain', 'sft')}
  for name in ('pretrain', 'sft'):
    config = config_lib.load_named(name, 'tiny')
    config.train.progress = False
    if name == 'sft':
      config.init.run = dirs['pretrain']
    dispatch.run(config, dirs[name])
  return dirs['sft']


def load_config(sft: str, seed: int):
  config = config_lib.load_named('reward_model', 'tiny')
  config.seed = seed
  config.init.run = sft
  config.train.update(steps=_STEPS.value, progress=False)
  config.prefs.update(num_prompts=_POOL.value, eval_fraction=_EVAL.value,
                      labels_per_pair=labels_per_pair()[-1], aggregate='majority')
  config.annotators.update(unreliable_fraction=_FRACTION.value,
                           unreliable_temperature=_TEMPERATURE.value,
                           unreliable_flip=_FLIP.value)
  from_run.resolve(config)
  config_lib.validate(config)
  return config


def settings(sft: str) -> dict:
  return {'sft_run': sft, 'labels': labels_per_pair(), 'budget': _BUDGET.value,
          'steps': _STEPS.value, 'pool_prompts': _POOL.value,
          'eval_fraction': _EVAL.value, 'unreliable_fraction': _FRACTION.value,
          'unreliable_temperature': _TEMPERATURE.value, 'flip': _FLIP.value}


def pool(config, setup, out: str):
  """The seed's preference pool (made once), checked to be the one these settings make."""
  directory = os.path.join(out, f'seed{config.seed}', 'preferences')
  if not preferences.shard_paths(directory):
    preference_data.make_shard(config, setup, directory=directory)
  pairs, lineages = preferences.read(directory)
  want = {'annotators': config.annotators.to_dict(),
          'labels_per_pair': config.prefs.labels_per_pair, 'init_run': setup.init.workdir}
  if any(lineages[0].get(k) != v for k, v in want.items()):
    raise UserError(f'{directory} was made with other settings; use a fresh --out')
  return pairs


def experiment(out: str) -> list[dict]:
  sft = sft_run(out)
  done_path, settings_path = os.path.join(out, 'records.jsonl'), os.path.join(out, 'settings.json')
  if os.path.exists(settings_path):
    with open(settings_path) as f:
      if json.load(f) != settings(sft):
        raise UserError(f'{out} holds an experiment with other settings; use a fresh --out')
  else:
    with open(settings_path, 'w') as f:
      json.dump(settings(sft), f, indent=2)
  records = []
  if os.path.exists(done_path):
    with open(done_path) as f:
      records = [json.loads(line) for line in f]
  done = {(r['seed'], r['k'], r['aggregate']) for r in records}

  config = load_config(sft, 0)
  setup = from_run.FromRun(config, rows_per_step=config.train.batch_size)
  model, state0, shardings, source0, _ = reward_model.build(
      config, setup, workdir=os.path.join(out, 'seed0'))
  put = lambda b: jax.device_put(b, sharding.batch_tree_sharding(setup.mesh, config.mesh, b))
  b = config.train.batch_size
  example = source0.eval_batches(max_batches=1)[0]
  batch_shardings = sharding.batch_tree_sharding(setup.mesh, config.mesh, example)
  step = jax.jit(lambda s, x: reward_step.train_step(s, x, model=model, tx=setup.tx,
                                                     schedule=setup.schedule,
                                                     bootstrap=False),
                 in_shardings=(shardings, batch_shardings),
                 out_shardings=(shardings, sharding.replicated(setup.mesh)), donate_argnums=(0,))
  restart = jax.jit(lambda state: jax.tree.map(jnp.copy, state), out_shardings=shardings)
  rewards = jax.jit(lambda params, x: reward_step.pair_rewards(params, x, model=model))

  def score(params, pairs, rows):
    """(chosen, rejected) [1, len(rows)] rewards."""
    outs = []
    for lo in range(0, len(rows), SCORE_BATCH):
      chunk = rows[lo:lo + SCORE_BATCH]
      valid = np.arange(SCORE_BATCH) < len(chunk)
      padded = np.concatenate([chunk, np.full(SCORE_BATCH - len(chunk), chunk[0])])
      c, r = jax.device_get(rewards(params, put(preference_data.pair_rows(pairs, padded,
                                                                          valid))))
      outs.append((np.asarray(c)[:, valid], np.asarray(r)[:, valid]))
    return tuple(np.concatenate(x, axis=1) for x in zip(*outs))

  with sharding.activate(setup.mesh, config.mesh):
    for seed in range(_SEEDS.value):
      seed_config = load_config(sft, seed)
      pairs = pool(seed_config, setup, out)
      train_rows, held_rows = split_by_prompt(np.asarray(pairs.prompt_id),
                                              eval_fraction=_EVAL.value, seed=seed)
      held_out = pairs.take(held_rows)
      group_utility = reward_eval.group_utilities(setup.world, held_out)
      order = np.random.default_rng((seed, 0xA66)).permutation(train_rows)
      for k in labels_per_pair():
        n = _BUDGET.value // k
        if n > len(order):
          raise UserError(f'seed {seed}: {len(order)} training pairs cannot take '
                          f'{_BUDGET.value} labels at {k} per pair; raise --pool_prompts')
        for method in METHODS:
          if (seed, k, method) in done:
            continue
          t0 = time.time()
          bought = preferences.aggregate(pairs.take(order[:n]), method=method,
                                         labels_per_pair=k)
          rng = np.random.default_rng((seed, k, METHODS.index(method)))
          state = restart(state0)
          for _ in range(_STEPS.value):
            rows = rng.choice(n, size=b, replace=n < b)
            state, _ = step(state, put(preference_data.pair_rows(bought, rows,
                                                                 np.ones(b, bool))))
          gold = reward_eval.metrics(*score(state.params, held_out, np.arange(len(held_out))),
                                     held_out, group_utility=group_utility)['rm/gold_accuracy']
          label_gold = reward_eval.label_metrics(bought)['prefs/aggregate_gold_agreement']
          record = {'seed': seed, 'k': k, 'aggregate': method, 'pairs': n,
                    'labels': n * k, 'label_gold_agreement': label_gold,
                    'rm_gold_agreement': gold, 'held_out_pairs': len(held_out)}
          records.append(record)
          with open(done_path, 'a') as f:
            f.write(json.dumps(record) + '\n')
          print(f'seed {seed} k={k} {method:>11} ({n} pairs): labels agree with gold '
                f'{label_gold:.3f}, reward model {gold:.3f} ({time.time() - t0:.0f}s)',
                flush=True)
  return [r for r in records if r['seed'] < _SEEDS.value]


def summarize(records: list[dict], out: str) -> dict:
  with open(os.path.join(out, 'annotator_aggregation.csv'), 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=list(records[0]))
    writer.writeheader()
    writer.writerows(sorted(records, key=lambda r: (r['k'], r['aggregate'], r['seed'])))
  stat = lambda v: (float(np.mean(v)), 1.96 * float(np.std(v)) / np.sqrt(len(v)))
  figures = {'seeds': _SEEDS.value, 'budget': _BUDGET.value, 'labels_per_pair': []}
  print(f'\n{"k":>2} {"pairs":>5}' + ''.join(f'  {m + " labels":>19}  {m + " RM":>19}'
                                            for m in METHODS))
  for k in labels_per_pair():
    row = [r for r in records if r['k'] == k]
    figures['labels_per_pair'].append(k)
    line = f'{k:>2} {row[0]["pairs"]:>5}'
    for m in METHODS:
      for key in ('label_gold_agreement', 'rm_gold_agreement'):
        mean, ci = stat([r[key] for r in row if r['aggregate'] == m])
        figures.setdefault(f'{m}_{key}', []).append([round(mean, 4), round(ci, 4)])
        line += f'  {mean:>10.3f} ± {ci:.3f}'
    print(line)
  return figures


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)  # orbax logs every restore at INFO
  start = time.time()
  try:
    out = os.path.abspath(_OUT.value)
    os.makedirs(out, exist_ok=True)
    records = experiment(out)
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  figures = summarize(records, out)
  print(json.dumps({**figures, 'seconds': round(time.time() - start)}))


if __name__ == '__main__':
  app.run(main)
