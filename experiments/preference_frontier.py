r"""Which preference method is best against the truth? Every loss of the DPO family
(train/preference_losses.LOSSES) at three strengths of its regulariser, PPO against a reward
model at three KL coefficients and best-of-n, all on the same preference pairs, placed on
one gold-reward vs KL-to-SFT frontier, at several annotator noise levels.

  python experiments/preference_frontier.py --sft_run=runs/sft_tiny --out=runs/frontier \
      [--seeds=3] [--sets=t0.1,t1,t0.1_len,t1_len] [--losses=dpo,ipo,...] \
      [--strengths=LOSS=V/V/V,...] [--dpo_steps=N] [--ppo_steps=N] [--kl_coefs=C,...] \
      [--ns=1,2,4,...] [--budgets=2,5,10] [--evals=3] [--set=STAGE.FIELD=VALUE ...] \
      [--shard=K/N]

Preference sets: `t<T>` is labelled by annotators of Bradley-Terry temperature T
(annotators.temperature), `t<T>_len<B>` (or `_len`, B = 0.02) also with a per-token liking
for length B that the gold reward does not share. For each set and seed k (config.seed = k:
the pairs' prompts, samples and labels, and every run's data order and sampling):
  OUT/<set>/seed<k>/rm        configs/reward_model.py:tiny, which makes the set in
                              rm/preferences; every other run reads it (prefs.dir)
  OUT/<set>/seed<k>/<loss>_<field><value>   configs/dpo.py:tiny with dpo.loss and its
                              strength field at one of STRENGTHS[loss]
  OUT/<set>/seed<k>/ppo_kl<c> configs/ppo.py:tiny against rm, ppo.kl_coef = c
  OUT/<set>/seed<k>/best_of_n experiments/best_of_n.py against rm (KL: log n - (n-1)/n; it
                              samples its own prompts, so its points are its gain over its
                              own n = 1 placed at the SFT policy's gold on the eval prompts)
--strengths replaces a loss's three values (e.g. orpo=1/3/10), --set overrides a field of
every run of one stage (rm, dpo or ppo; e.g. --set=dpo.optim.lr=1e-3 --set=rm.prefs.
num_prompts=256: the reward-model run makes the pairs), an empty --kl_coefs or --ns skips
PPO or best-of-n. One SFT run (the chain's) serves every set and seed: policy, reference and sampler of the
pairs. Each run's end point is its last eval's policy/gold_reward and policy/kl_ref (the
sequence KL to the SFT policy, nats) on the same fixed eval prompts; every run starts at the
SFT policy's point.

Runs go in-process one after another and each writes `done.json` when finished, so a
rerun of the same command resumes the unfinished ones (a stopped run continues from its last
checkpoint: one per eval, --evals after step 0) and reads the rest; --summary_only starts no
run and summarises the finished ones. --shard=K/N runs only every N-th run from the K-th
(start N processes, then once more without --shard to summarise).

Writes OUT/points.csv (one row per run and seed: set, seed, method, setting, kl, gold,
gold_se), OUT/frontier.csv (per set, method and KL budget: the best end-point gold within the
budget, mean and 95% t-interval over seeds, and how many seeds had a point inside it),
OUT/winners.csv (per set and budget: the method with the best mean, and the methods whose
paired difference to it over seeds has a 95% interval holding 0: tied within the noise),
OUT/frontier.png (gold against KL per set, one curve per method over its strengths, means
over seeds); prints the markdown table and, last, one JSON line. Bad input: one
`error: ...` line, exit status 2.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from rlhf_jax.analysis import compare  # noqa: E402
from rlhf_jax.errors import UserError  # noqa: E402
from model_collapse import write_csv  # noqa: E402

# Three strengths of each loss's regulariser (its registry entry's `strength` field), chosen
# so that 300 steps of configs/dpo.py:tiny span KL ~1-10 nats: beta for the log-ratio losses;
# tau for IPO (target margin 1/(2 tau): 50 / 17 / 5 nats summed, 1.7 / 0.5 / 0.17 per token
# averaged); for ORPO the weight of its odds-ratio term against its SFT term (at 0.1, the
# paper's, its SFT term holds the policy within KL 0.8 of the SFT policy here).
STRENGTHS = {
    'dpo': (0.03, 0.1, 0.3), 'cdpo': (0.03, 0.1, 0.3), 'robust_dpo': (0.03, 0.1, 0.3),
    'hinge': (0.03, 0.1, 0.3), 'kto': (0.03, 0.1, 0.3), 'apo_zero': (0.03, 0.1, 0.3),
    'ipo': (0.01, 0.03, 0.1), 'ipo_mean': (0.3, 1.0, 3.0),
    'simpo': (1.0, 2.0, 4.0), 'orpo': (1.0, 3.0, 10.0),
}
SIMPO_GAMMA_OVER_BETA = 0.5
KL_COEFS = (0.02, 0.05, 0.2)
LENGTH_BIAS = 0.02


class _Parser(argparse.ArgumentParser):
  def error(self, message):
    raise UserError(message)


def _floats(text: str, flag: str, *, sep: str = ',', empty: bool = False) -> list[float]:
  try:
    values = [float(v) for v in text.split(sep) if v]
  except ValueError:
    raise UserError(f'{flag}={text} must be numbers separated by {sep!r}') from None
  if not values and not empty:
    raise UserError(f'{flag} is empty')
  return values


def parse_strengths(text: str) -> dict:
  """'orpo=1/3/10,ipo=0.02' -> {'orpo': (1, 3, 10), 'ipo': (0.02,)}."""
  out = {}
  for item in filter(None, text.split(',')):
    loss, eq, values = item.partition('=')
    if not eq or loss not in STRENGTHS:
      raise UserError(f'--strengths: {item!r} is not LOSS=V/V/... with LOSS one of '
                      f'{",".join(STRENGTHS)}')
    out[loss] = tuple(_floats(values, f'--strengths {loss}', sep='/'))
    if min(out[loss]) < 0:
      raise UserError(f'--strengths: {item!r} has a negative value')
  return out


def _value(text: str):
  for kind in (int, float):
    try:
      return kind(text)
    except ValueError:
      pass
  return {'True': True, 'False': False}.get(text, text)


def parse_overrides(items: list[str]) -> dict:
  """['dpo.optim.lr=1e-3'] -> {'dpo': {'optim.lr': 0.001}}."""
  out = {'rm': {}, 'dpo': {}, 'ppo': {}}
  for item in items:
    key, eq, value = item.partition('=')
    stage, dot, field = key.partition('.')
    if not eq or not dot or stage not in out or not field:
      raise UserError(f'--set={item} is not STAGE.FIELD=VALUE with STAGE one of rm, dpo, ppo')
    out[stage][field] = _value(value)
  return out


def parse_set(name: str) -> dict:
  """'t0.1' -> temperature 0.1, no length bias; 't1_len' / 't1_len0.05' -> with one."""
  head, sep, length = name.partition('_len')
  try:
    if not head.startswith('t') or (sep and length.startswith('-')):
      raise ValueError
    temperature = float(head[1:])
    bias = (float(length) if length else LENGTH_BIAS) if sep else 0.0
  except ValueError:
    raise UserError(f'--sets: {name!r} is not t<temperature> or t<temperature>_len[<bias>]'
                    ) from None
  if temperature < 0:
    raise UserError(f'--sets: {name!r} has a negative temperature')
  return {'name': name, 'temperature': temperature, 'length_bias': bias}


def parse_args(argv=None):
  from rlhf_jax.train.preference_losses import LOSSES
  p = _Parser(description=__doc__.split('\n\n')[0], allow_abbrev=False)
  p.add_argument('--sft_run', default='runs/sft_tiny')
  p.add_argument('--out', default='runs/preference_frontier')
  p.add_argument('--seeds', type=int, default=3)
  p.add_argument('--sets', default='t0.1,t1,t0.1_len,t1_len')
  p.add_argument('--losses', default=','.join(LOSSES))
  p.add_argument('--dpo_steps', type=int, default=None, help="default: configs/dpo.py:tiny's")
  p.add_argument('--ppo_steps', type=int, default=None, help="default: configs/ppo.py:tiny's")
  p.add_argument('--kl_coefs', default=','.join(map(str, KL_COEFS)))
  p.add_argument('--ns', default='1,2,4,8,16,32,64')
  p.add_argument('--budgets', default='2,5,10')
  p.add_argument('--eval_prompts', type=int, default=None,
                 help="policy_eval.num_prompts of every run (default: the configs')")
  p.add_argument('--evals', type=int, default=3,
                 help='evals (and checkpoints) per DPO / PPO run after step 0')
  p.add_argument('--strengths', default='')
  p.add_argument('--set', action='append', default=[], dest='overrides')
  p.add_argument('--shard', default='0/1')
  p.add_argument('--summary_only', action='store_true',
                 help='start no run: summarise the finished ones (the others are skipped)')
  args = p.parse_args(argv)
  args.strengths = parse_strengths(args.strengths)
  args.overrides = parse_overrides(args.overrides)
  args.sets = [parse_set(s) for s in dict.fromkeys(args.sets.split(',')) if s]
  args.losses = [l for l in dict.fromkeys(args.losses.split(',')) if l]
  unknown = sorted(set(args.losses) - set(LOSSES))
  if unknown or not args.sets:
    raise UserError(f'--losses: {",".join(unknown)} not in {",".join(LOSSES)}' if unknown
                    else '--sets is empty')
  args.kl_coefs = _floats(args.kl_coefs, '--kl_coefs', empty=True)
  args.budgets = _floats(args.budgets, '--budgets')
  args.ns = [int(n) for n in _floats(args.ns, '--ns', empty=True)]
  if args.ns and (min(args.ns) < 1 or 1 not in args.ns):
    raise UserError(f'--ns must be >= 1 and hold 1 (the SFT policy): {args.ns}')
  if min(args.kl_coefs, default=0) < 0:
    raise UserError(f'--kl_coefs must be >= 0: {args.kl_coefs}')
  for name in ('seeds', 'dpo_steps', 'ppo_steps', 'eval_prompts', 'evals'):
    value = getattr(args, name)
    if value is not None and value < 1:
      raise UserError(f'--{name}={value} must be >= 1')
  try:
    k, n = (int(x) for x in args.shard.split('/'))
    if not 0 <= k < n:
      raise ValueError
  except ValueError:
    raise UserError(f'--shard={args.shard} is not K/N with 0 <= K < N') from None
  args.shard = (k, n)
  return args


def dpo_settings(losses: list[str], strengths: dict) -> list[tuple[str, str, dict]]:
  """(method, setting label, dpo.* overrides) for every loss and strength."""
  from rlhf_jax.train.preference_losses import LOSSES
  out = []
  for loss in losses:
    field = LOSSES[loss].strength
    for value in strengths.get(loss, STRENGTHS[loss]):
      over = {'loss': loss, field: value}
      if loss == 'simpo':
        over['gamma'] = SIMPO_GAMMA_OVER_BETA * value
      out.append((loss, f'{field}={value:g}', over))
  return out


class Runner:
  """Builds each run's config and runs it in-process (finished runs leave done.json)."""

  def __init__(self, args):
    from rlhf_jax import config as config_lib
    self.args, self.config_lib = args, config_lib
    self.sft = os.path.abspath(args.sft_run)
    for stage in ('reward_model', 'dpo', 'ppo'):   # a bad --set fails before any run
      config_lib.validate(self._config(stage, args.sets[0], 0, None))

  def _config(self, stage: str, set_: dict, seed: int, steps: int | None):
    c = self.config_lib.load_named(stage, 'tiny')
    c.seed = seed
    c.init.run = self.sft
    c.annotators.update(temperature=set_['temperature'], length_bias=set_['length_bias'])
    c.train.progress = False
    if stage != 'reward_model':
      steps = c.train.steps if steps is None else steps
      every = max(steps // self.args.evals, 1)
      c.train.update(steps=steps, eval_every=every, ckpt_every=every)
    if self.args.eval_prompts is not None:
      c.policy_eval.num_prompts = self.args.eval_prompts
    for dotted, value in self.args.overrides[{'reward_model': 'rm'}.get(stage, stage)].items():
      *parents, leaf = dotted.split('.')
      node = c
      for name in parents:
        node = node.get(name) if hasattr(node, 'get') else None
      if not hasattr(node, 'get') or leaf not in node:
        raise UserError(f'--set: configs/{stage}.py:tiny has no field {dotted}')
      try:
        node[leaf] = value
      except TypeError as e:
        raise UserError(f'--set {dotted}={value!r}: {e}') from None
    return c

  def run(self, config, workdir: str, eval_key: str = 'policy/gold_reward') -> dict:
    """The run's first and last eval rows, those holding `eval_key` (loaded from done.json
    when it finished before)."""
    from rlhf_jax.stages import dispatch
    done = os.path.join(workdir, 'done.json')
    if os.path.exists(done):
      with open(done) as f:
        return json.load(f)
    t0 = time.time()
    dispatch.run(config, workdir)
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      evals = [r for r in map(json.loads, f) if eval_key in r]
    record = {'first': evals[0], 'last': evals[-1]}
    with open(done + '.tmp', 'w') as f:
      json.dump(record, f)
    os.replace(done + '.tmp', done)
    print(f'{workdir}: {time.time() - t0:.0f}s', flush=True)
    return record

  def jobs(self, set_: dict, seed: int):
    """(method, setting, workdir, thunk) of every run of one set and seed; the reward
    model's first (it makes the pairs)."""
    d = os.path.join(os.path.abspath(self.args.out), set_['name'], f'seed{seed}')
    rm = os.path.join(d, 'rm')
    prefs = os.path.join(rm, 'preferences')
    yield 'rm', '', rm, lambda: self.run(self._config('reward_model', set_, seed, None), rm,
                                         eval_key='rm/gold_accuracy')
    for method, setting, over in dpo_settings(self.args.losses, self.args.strengths):
      workdir = os.path.join(d, f'{method}_{setting.replace("=", "")}')
      def thunk(over=over, workdir=workdir):
        c = self._config('dpo', set_, seed, self.args.dpo_steps)
        c.dpo.update(over)
        c.prefs.dir = prefs
        return self.run(c, workdir)
      yield method, setting, workdir, thunk
    for coef in self.args.kl_coefs:  # every PPO run's reward model is this set's
      workdir = os.path.join(d, f'ppo_kl{coef:g}')
      def thunk(coef=coef, workdir=workdir):
        c = self._config('ppo', set_, seed, self.args.ppo_steps)
        c.ppo.update(rm_run=rm, kl_coef=coef)
        return self.run(c, workdir)
      yield 'ppo', f'kl_coef={coef:g}', workdir, thunk
    if self.args.ns:
      bon = os.path.join(d, 'best_of_n')
      yield 'best_of_n', '', bon, lambda: best_of_n(self.args, rm, bon, seed)


def finished(method: str, workdir: str) -> bool:
  return os.path.exists(os.path.join(workdir, 'best_of_n.csv' if method == 'best_of_n'
                                     else 'done.json'))


def best_of_n(args, rm: str, out: str, seed: int) -> list[dict]:
  """experiments/best_of_n.py against the set's reward model: its csv rows."""
  import csv
  path = os.path.join(out, 'best_of_n.csv')
  if not os.path.exists(path):
    cmd = [sys.executable, os.path.join(REPO, 'experiments', 'best_of_n.py'),
           f'--sft_run={os.path.abspath(args.sft_run)}', f'--rm_run={rm}', f'--out={out}',
           f'--ns={",".join(map(str, args.ns))}', f'--seed={seed}']
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if result.returncode:
      raise UserError('best_of_n.py failed: ' +
                      (result.stderr.strip().splitlines() or ['?'])[-1])
  with open(path) as f:
    return list(csv.DictReader(f))


def points_of(set_name: str, seed: int, method: str, setting: str, record,
              sft_gold: float | None = None) -> list[dict]:
  """The run's end point(s). best_of_n.py scores its own prompts, not the policy eval's, so
  its points are its gain over its own n = 1 placed at `sft_gold`, the SFT policy's gold on
  the common eval prompts (raw when there is none: no DPO-family or PPO run)."""
  base = {'set': set_name, 'seed': seed, 'method': method}
  if method == 'best_of_n':
    one = next(float(r['gold_of_proxy_best']) for r in record if int(r['n']) == 1)
    shift = 0.0 if sft_gold is None else sft_gold - one
    return [{**base, 'setting': f'n={r["n"]}', 'kl': float(r['kl_bound']),
             'gold': float(r['gold_of_proxy_best']) + shift,
             'gold_se': float(r['gold_of_proxy_best_ci95']) / 1.96} for r in record]
  last = record['last']
  return [{**base, 'setting': setting, 'kl': max(float(last['policy/kl_ref']), 0.0),
           'gold': float(last['policy/gold_reward']),
           'gold_se': float(last['policy/gold_reward_se'])}]


def sft_point(set_name: str, seed: int, record) -> dict:
  """The SFT policy's point: step 0 of a run that starts from it (same eval prompts)."""
  first = record['first']
  return {'set': set_name, 'seed': seed, 'method': 'sft', 'setting': '', 'kl': 0.0,
          'gold': float(first['policy/gold_reward']),
          'gold_se': float(first['policy/gold_reward_se'])}


def frontier(points: list[dict], budgets: list[float]) -> list[dict]:
  """Per set, method and budget: best end-point gold with kl <= budget, over seeds."""
  rows = []
  for s in dict.fromkeys(p['set'] for p in points):
    for m in dict.fromkeys(p['method'] for p in points if p['set'] == s):
      seeds = sorted({p['seed'] for p in points if p['set'] == s and p['method'] == m})
      for b in budgets:
        best = [max((p['gold'] for p in points if p['set'] == s and p['method'] == m
                     and p['seed'] == k and p['kl'] <= b), default=math.nan) for k in seeds]
        inside = [v for v in best if not math.isnan(v)]
        mean, half = compare.interval(values=inside) if inside else (math.nan, None)
        rows.append({'set': s, 'method': m, 'budget': b, 'gold_mean': mean,
                     'gold_ci95': half, 'seeds_inside': len(inside), 'seeds': len(seeds),
                     'per_seed': best})
  return rows


def winners(rows: list[dict]) -> list[dict]:
  """Per set and budget: the best mean (methods with every seed inside the budget) and the
  methods tied with it: the paired per-seed difference's 95% t-interval holds 0."""
  out = []
  for s in dict.fromkeys(r['set'] for r in rows):
    for b in dict.fromkeys(r['budget'] for r in rows if r['set'] == s):
      cells = [r for r in rows if r['set'] == s and r['budget'] == b and r['method'] != 'sft'
               and r['seeds_inside'] == r['seeds']]
      if not cells:
        continue
      top = max(cells, key=lambda r: r['gold_mean'])
      if top['seeds'] < 2:       # no interval to judge a tie by
        out.append({'set': s, 'budget': b, 'winner': top['method'],
                    'gold_mean': top['gold_mean'], 'gold_ci95': None, 'seeds': top['seeds'],
                    'tied_within_noise': 'unknown (one seed)'})
        continue
      tied = []
      for r in cells:
        if r is top:
          continue
        diff = np.array(top['per_seed']) - np.array(r['per_seed'])
        mean, half = compare.interval(values=diff)
        if half is None or mean - half <= 0:
          tied.append(r['method'])
      out.append({'set': s, 'budget': b, 'winner': top['method'],
                  'gold_mean': top['gold_mean'], 'gold_ci95': top['gold_ci95'],
                  'seeds': top['seeds'], 'tied_within_noise': ' '.join(tied)})
  return out


def markdown(rows: list[dict], budgets: list[float]) -> str:
  sets = list(dict.fromkeys(r['set'] for r in rows))
  head = ' | '.join(f'{s} KL<={b:g}' for s in sets for b in budgets)
  lines = [f'| method | {head} |', '|---|' + '---:|' * (len(sets) * len(budgets))]
  for m in dict.fromkeys(r['method'] for r in rows):
    cells = []
    for s in sets:
      for b in budgets:
        r = next((r for r in rows if r['method'] == m and r['set'] == s and r['budget'] == b),
                 None)
        if r is None or math.isnan(r['gold_mean']):
          cells.append('-')
        else:
          ci = '' if r['gold_ci95'] is None else f' ± {r["gold_ci95"]:.3f}'
          part = '' if r['seeds_inside'] == r['seeds'] else \
              f' ({r["seeds_inside"]}/{r["seeds"]})'
          cells.append(f'{r["gold_mean"]:.3f}{ci}{part}')
    lines.append(f'| {m} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def plot(points: list[dict], path: str) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  sets = list(dict.fromkeys(p['set'] for p in points))
  cols = min(len(sets), 2)
  rows = math.ceil(len(sets) / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 4.5 * rows), squeeze=False,
                           sharey=True)
  methods = [m for m in dict.fromkeys(p['method'] for p in points) if m != 'sft']
  for ax, s in zip(axes.flat, sets):
    for i, m in enumerate(methods):
      pts = [p for p in points if p['set'] == s and p['method'] == m]
      settings = list(dict.fromkeys(p['setting'] for p in pts))
      kl = [np.mean([p['kl'] for p in pts if p['setting'] == st]) for st in settings]
      gold = [np.mean([p['gold'] for p in pts if p['setting'] == st]) for st in settings]
      order = np.argsort(kl)
      ax.plot(np.array(kl)[order], np.array(gold)[order], marker='os^vD<>ph*xP+'[i % 13],
              lw=1, ms=4, color=f'C{i % 10}', ls='-' if i < 10 else '--', label=m)
    sft = [p['gold'] for p in points if p['set'] == s and p['method'] == 'sft']
    if sft:
      ax.axhline(np.mean(sft), color='k', lw=0.8, ls=':', label='SFT')
    ax.set_title(f'preference set {s}')
    ax.set_xlabel('KL to SFT (nats per sequence)')
  axes[0, 0].set_ylabel('gold reward (mean over seeds)')
  axes.flat[0].legend(fontsize=7, ncol=2)
  for ax in list(axes.flat)[len(sets):]:
    ax.set_visible(False)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main(argv=None) -> None:
  start = time.time()
  try:
    args = parse_args(argv)
    runner = Runner(args)
    from rlhf_jax.train import runs
    if not args.summary_only:  # a summary reads the runs' records only
      runs.read_config(os.path.abspath(args.sft_run), role='--sft_run')
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    if not (args.summary_only or os.environ.get('JAX_COMPILATION_CACHE_DIR')):
      # the runs compile the same programs
      import jax
      jax.config.update('jax_compilation_cache_dir', os.path.join(out, '.xla_cache'))
    k, n = args.shard
    points, index, with_sft, skipped = [], 0, set(), 0
    for seed in range(args.seeds):
      for set_ in args.sets:
        for method, setting, workdir, thunk in runner.jobs(set_, seed):
          mine = method == 'rm' or index % n == k
          index += method != 'rm'
          if not mine:
            continue
          if method == 'rm' and n > 1 and not os.path.exists(os.path.join(workdir, 'done.json')):
            if k != 0:             # shard 0 makes the set; the others wait for it
              while not os.path.exists(os.path.join(workdir, 'done.json')):
                time.sleep(5)
              continue
          if args.summary_only and not finished(method, workdir):
            skipped += 1
            continue
          record = thunk()
          if method == 'rm':
            continue
          if method != 'best_of_n' and (set_['name'], seed) not in with_sft:
            with_sft.add((set_['name'], seed))
            points.append(sft_point(set_['name'], seed, record))
          sft = next((p['gold'] for p in points if p['method'] == 'sft' and
                      (p['set'], p['seed']) == (set_['name'], seed)), None)
          points += points_of(set_['name'], seed, method, setting, record, sft_gold=sft)
    if n > 1:
      print(f'shard {k}/{n} done in {time.time() - start:.0f}s; rerun without --shard to '
            'summarise', flush=True)
      return
  except (UserError, OSError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  if skipped:
    print(f'--summary_only: {skipped} unfinished runs left out', flush=True)
  if not points:
    print('error: no finished run to summarise', file=sys.stderr)
    sys.exit(2)
  rows = frontier(points, args.budgets)
  wins = winners(rows)
  write_csv(os.path.join(out, 'points.csv'), points)
  write_csv(os.path.join(out, 'frontier.csv'),
            [{k: v for k, v in r.items() if k != 'per_seed'} for r in rows])
  write_csv(os.path.join(out, 'winners.csv'), wins)
  plot(points, os.path.join(out, 'frontier.png'))
  table = markdown(rows, args.budgets)
  print(table)
  for w in wins:
    print(f'{w["set"]} KL<={w["budget"]:g}: {w["winner"]} {w["gold_mean"]:.3f}; tied within '
          f'the noise: {w["tied_within_noise"] or "none"}')
  print(json.dumps({'seeds': args.seeds, 'sets': [s['name'] for s in args.sets],
                    'winners': wins, 'seconds': round(time.time() - start, 1)}))


if __name__ == '__main__':
  main()
