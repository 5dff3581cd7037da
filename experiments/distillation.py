r"""Does on-policy distillation beat off-policy on our world, and at which student size?

  python experiments/distillation.py --pretrain_run=runs/pretrain_tiny \
      --ppo_run=runs/ppo_tiny --out=runs/distillation [--seeds=3] [--sizes=d32x1,d48x2] \
      [--methods=scratch,kd,seq_kd,gkd_l0_b0.1,...] [--steps=300] [--shard=K/N] \
      [--summary_only]

Every student is fresh, of one of SIZES, trained by configs/distill.py for --steps steps of
32 rows (the same token budget for every method), seed k = config.seed (its init, its rows,
its samples):
  scratch          distill.loss=ce on the world's true sequences: no teacher, the baseline
  kd               Hinton KD (alpha 1, temperature 1)
  seq_kd           cross-entropy on the teacher's samples
  gkd_l<L>_b<B>    generalised JSD with beta B, a fraction L of each batch sampled by the
                   student (L = 0: off-policy; 1: fully on-policy)
for two teachers: `pretrain` (--pretrain_run; off-policy rows are the world's true
sequences, as the teacher's own pretraining saw) and `ppo` (--ppo_run, an RLHF'd policy;
off-policy rows are its samples after the world's prompts, configs/distill.py:tiny_ppo).
The gap closed, per seed against that seed's scratch student:
  pretrain: (true KL of scratch - distilled) / (scratch - teacher)   (eval/true_kl)
  ppo:      (gold of distilled - scratch) / (teacher - scratch)      (policy/gold_reward)

Runs go in-process one after another, each writing done.json when finished, so a rerun
resumes the unfinished ones and reads the rest; --summary_only runs nothing; --shard=K/N
runs every N-th run from the K-th (then once more without --shard to summarise).

Writes OUT/points.csv (one row per run), OUT/summary.csv (per teacher, size and method: the
metric and the gap closed, means and 95% t-intervals over seeds), OUT/on_policy.csv (per
teacher, size and beta: gkd fully on-policy minus off-policy, the paired per-seed
difference of the gap closed and its interval), OUT/distillation.png; prints the markdown
table and, last, one JSON line. Bad input: one `error: ...` line, exit status 2.
"""
import argparse
import csv
import json
import math
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from rlhf_jax.errors import UserError  # noqa: E402

# Student sizes: 20,576 and 80,112 parameters (the teacher of pretrain.py:tiny: 139,584).
SIZES = {'d32x1': dict(d_model=32, n_layers=1, n_heads=2, d_ff=128),
         'd48x2': dict(d_model=48, n_layers=2, n_heads=4, d_ff=192)}
LAMBDAS, BETAS = (0.0, 0.5, 1.0), (0.1, 0.5, 0.9)
METHODS = ['scratch', 'kd', 'seq_kd'] + [f'gkd_l{l:g}_b{b:g}' for l in LAMBDAS for b in BETAS]
TEACHERS = {'pretrain': ('tiny', 'eval/true_kl', -1.0),    # (variant, metric, sign: higher
            'ppo': ('tiny_ppo', 'policy/gold_reward', 1.0)}  # is better when positive


def method_overrides(method: str) -> dict:
  """distill.* of a method (the off-policy data is the teacher variant's)."""
  if method == 'scratch':
    return {'loss': 'ce', 'data': 'world', 'prompt_len': 1}
  if method == 'kd':
    return {'loss': 'kd'}
  if method == 'seq_kd':
    return {'loss': 'seq_kd', 'data': 'teacher'}
  try:
    _, lam, beta = method.split('_')
    return {'loss': 'gkd', 'on_policy_fraction': float(lam[1:]), 'beta': float(beta[1:])}
  except ValueError:
    raise UserError(f'--methods: unknown method {method!r}; choose from {METHODS}') from None


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--pretrain_run', default='', help='a pretrained world LM (the teacher)')
  p.add_argument('--ppo_run', default='', help="an RLHF'd policy (a second teacher)")
  p.add_argument('--out', required=True)
  p.add_argument('--seeds', type=int, default=3)
  p.add_argument('--sizes', default=','.join(SIZES))
  p.add_argument('--methods', default=','.join(METHODS))
  p.add_argument('--steps', type=int, default=300)
  p.add_argument('--shard', default='0/1')
  p.add_argument('--summary_only', action='store_true')
  args = p.parse_args(argv)
  args.teachers = {name: os.path.abspath(run) for name, run in
                   (('pretrain', args.pretrain_run), ('ppo', args.ppo_run)) if run}
  if not args.teachers:
    raise UserError('name a teacher: --pretrain_run and/or --ppo_run')
  args.sizes = [s for s in args.sizes.split(',') if s]
  for s in args.sizes:
    if s not in SIZES:
      raise UserError(f'--sizes: unknown size {s!r}; choose from {list(SIZES)}')
  args.methods = [m for m in args.methods.split(',') if m]
  for m in args.methods:
    method_overrides(m)
  if 'scratch' not in args.methods:
    raise UserError('--methods must hold scratch: the gap closed is measured against it')
  if args.seeds < 1 or args.steps < 1:
    raise UserError(f'--seeds={args.seeds} and --steps={args.steps} must be >= 1')
  try:
    k, n = (int(x) for x in args.shard.split('/'))
    if not 0 <= k < n:
      raise ValueError
  except ValueError:
    raise UserError(f'--shard={args.shard} is not K/N with 0 <= K < N') from None
  args.shard = (k, n)
  return args


def config_of(args, teacher: str, size: str, method: str, seed: int):
  from rlhf_jax import config as config_lib
  c = config_lib.load_named('distill', TEACHERS[teacher][0])
  c.seed = seed
  c.distill.teacher_run = args.teachers[teacher]
  c.distill.update(method_overrides(method))
  c.model.update(SIZES[size])
  c.train.update(steps=args.steps, eval_every=args.steps, ckpt_every=args.steps,
                 progress=False)
  config_lib.validate(c)
  return c


def run(config, workdir: str) -> dict:
  """The run's first and last metrics rows (from done.json when it finished before)."""
  from rlhf_jax.stages import dispatch
  done = os.path.join(workdir, 'done.json')
  if os.path.exists(done):
    with open(done) as f:
      return json.load(f)
  t0 = time.time()
  dispatch.run(config, workdir)
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  record = {'first': rows[0], 'last': rows[-1], 'seconds': round(time.time() - t0, 1)}
  with open(done + '.tmp', 'w') as f:
    json.dump(record, f)
  os.replace(done + '.tmp', done)
  print(f'{workdir}: {record["seconds"]:.0f}s', flush=True)
  return record


def point(teacher, size, method, seed, record) -> dict:
  first, last = record['first'], record['last']
  metric = TEACHERS[teacher][1]
  row = {'teacher': teacher, 'size': size, 'method': method, 'seed': seed,
         'metric': last[metric], 'teacher_metric': first[f'distill/teacher_{metric.split("/")[1]}'],
         'true_kl': last['eval/true_kl'], 'kl_to_teacher': last['distill/kl_to_teacher'],
         'kl_from_teacher': last['distill/kl_from_teacher'],
         'student_params': first['distill/student_params']}
  for key in ('policy/gold_reward', 'policy/kl_ref', 'policy/harm_rate'):
    if key in last:
      row[key.split('/')[1]] = last[key]
  return row


def summarise(points: list[dict]):
  """(summary rows, on-policy rows): the gap closed per seed against its scratch student."""
  from rlhf_jax.analysis import compare
  scratch = {(p['teacher'], p['size'], p['seed']): p['metric'] for p in points
             if p['method'] == 'scratch'}
  for p in points:
    base = scratch.get((p['teacher'], p['size'], p['seed']))
    p['gap_closed'] = (math.nan if base is None or p['teacher_metric'] == base
                       else (p['metric'] - base) / (p['teacher_metric'] - base))
  summary, keyed = [], {}
  for key in dict.fromkeys((p['teacher'], p['size'], p['method']) for p in points):
    cell = sorted((p for p in points if (p['teacher'], p['size'], p['method']) == key),
                  key=lambda p: p['seed'])
    keyed[key] = {p['seed']: p['gap_closed'] for p in cell}
    metric, metric_ci = compare.interval(values=[p['metric'] for p in cell])
    gaps = [p['gap_closed'] for p in cell if not math.isnan(p['gap_closed'])]
    gap, gap_ci = compare.interval(values=gaps) if gaps else (math.nan, None)
    summary.append({'teacher': key[0], 'size': key[1], 'method': key[2],
                    'metric_name': TEACHERS[key[0]][1], 'metric_mean': metric,
                    'metric_ci95': metric_ci, 'gap_closed_mean': gap, 'gap_closed_ci95': gap_ci,
                    'kl_from_teacher_mean': sum(p['kl_from_teacher'] for p in cell) / len(cell),
                    'seeds': len(cell)})
  on_policy = []
  for (teacher, size, method), by_seed in keyed.items():
    if not method.startswith('gkd_l1_'):
      continue
    off = keyed.get((teacher, size, method.replace('gkd_l1_', 'gkd_l0_')))
    seeds = sorted(set(by_seed) & set(off or {}))
    if not seeds:
      continue
    diff, half = compare.interval(values=[by_seed[k] - off[k] for k in seeds])
    on_policy.append({'teacher': teacher, 'size': size, 'beta': method.split('_b')[1],
                      'on_minus_off_gap_closed': diff, 'ci95': half, 'seeds': len(seeds),
                      'verdict': ('one seed: no interval' if half is None else
                                  'on-policy better' if diff - half > 0 else
                                  'off-policy better' if diff + half < 0 else
                                  'within the noise')})
  return summary, on_policy


def fmt(mean, half, digits=3) -> str:
  if mean is None or (isinstance(mean, float) and math.isnan(mean)):
    return '-'
  return f'{mean:.{digits}f}' + ('' if half is None else f' ± {half:.{digits}f}')


def markdown(summary: list[dict]) -> str:
  lines = []
  for teacher in dict.fromkeys(r['teacher'] for r in summary):
    rows = [r for r in summary if r['teacher'] == teacher]
    sizes = list(dict.fromkeys(r['size'] for r in rows))
    name = rows[0]['metric_name']
    lines += [f'teacher `{teacher}`: {name} and the gap closed, per student size', '',
              '| method | ' + ' | '.join(f'{s} {name} | {s} gap closed' for s in sizes) + ' |',
              '|---|' + '---|---|' * len(sizes)]
    for method in dict.fromkeys(r['method'] for r in rows):
      cells = []
      for s in sizes:
        r = next((r for r in rows if r['size'] == s and r['method'] == method), None)
        cells += (['-', '-'] if r is None else
                  [fmt(r['metric_mean'], r['metric_ci95']),
                   fmt(r['gap_closed_mean'], r['gap_closed_ci95'], 2)])
      lines.append(f'| {method} | ' + ' | '.join(cells) + ' |')
    lines.append('')
  return '\n'.join(lines)


def plot(summary: list[dict], path: str) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  teachers = list(dict.fromkeys(r['teacher'] for r in summary))
  fig, axes = plt.subplots(1, len(teachers), figsize=(7 * len(teachers), 4.5), squeeze=False)
  for ax, teacher in zip(axes[0], teachers):
    rows = [r for r in summary if r['teacher'] == teacher and r['method'] != 'scratch']
    methods = list(dict.fromkeys(r['method'] for r in rows))
    sizes = list(dict.fromkeys(r['size'] for r in rows))
    width = 0.8 / max(len(sizes), 1)
    for i, size in enumerate(sizes):
      cells = [next((r for r in rows if r['method'] == m and r['size'] == size), None)
               for m in methods]
      ax.bar([j + i * width for j in range(len(methods))],
             [c['gap_closed_mean'] if c else 0 for c in cells], width,
             yerr=[(c['gap_closed_ci95'] or 0) if c else 0 for c in cells], label=size,
             capsize=2)
    ax.set_xticks([j + width * (len(sizes) - 1) / 2 for j in range(len(methods))])
    ax.set_xticklabels(methods, rotation=60, ha='right', fontsize=8)
    ax.axhline(0, color='k', lw=0.5)
    ax.set_ylabel('gap closed (0: scratch, 1: teacher)')
    ax.set_title(f'teacher: {teacher} ({rows[0]["metric_name"] if rows else ""})')
    ax.legend(title='student')
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def write_csv(path: str, rows: list[dict]) -> None:
  fields = list(dict.fromkeys(k for r in rows for k in r))
  with open(path + '.tmp', 'w', newline='') as f:
    w = csv.DictWriter(f, fieldnames=fields)
    w.writeheader()
    w.writerows(rows)
  os.replace(path + '.tmp', path)


def main(argv=None) -> None:
  start = time.time()
  try:
    args = parse_args(argv)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    if not os.environ.get('JAX_COMPILATION_CACHE_DIR'):  # the runs compile the same programs
      import jax
      jax.config.update('jax_compilation_cache_dir', os.path.join(out, '.xla_cache'))
    jobs = [(t, s, m, k) for k in range(args.seeds) for t in args.teachers
            for s in args.sizes for m in args.methods]
    for teacher in args.teachers:  # every config checks before the first run
      config_of(args, teacher, args.sizes[0], args.methods[0], 0)
    k, n = args.shard
    points, skipped = [], 0
    for i, (teacher, size, method, seed) in enumerate(jobs):
      if i % n != k:
        continue
      workdir = os.path.join(out, teacher, size, method, f'seed{seed}')
      if args.summary_only and not os.path.exists(os.path.join(workdir, 'done.json')):
        skipped += 1
        continue
      record = run(config_of(args, teacher, size, method, seed), workdir)
      points.append(point(teacher, size, method, seed, record))
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
  summary, on_policy = summarise(points)
  write_csv(os.path.join(out, 'points.csv'), points)
  write_csv(os.path.join(out, 'summary.csv'), summary)
  if on_policy:
    write_csv(os.path.join(out, 'on_policy.csv'), on_policy)
  plot(summary, os.path.join(out, 'distillation.png'))
  print(markdown(summary))
  for r in on_policy:
    print(f'{r["teacher"]} {r["size"]} beta {r["beta"]}: on - off policy gap closed '
          f'{fmt(r["on_minus_off_gap_closed"], r["ci95"], 2)} ({r["verdict"]})')
  print(json.dumps({'seeds': args.seeds, 'steps': args.steps, 'on_policy': on_policy,
                    'best': {f'{t}/{s}': max((r for r in summary if r['teacher'] == t and
                                              r['size'] == s and r['method'] != 'scratch'),
                                             key=lambda r: r['gap_closed_mean'] if not
                                             math.isnan(r['gap_closed_mean']) else -1e9,
                                             default={}).get('method')
                             for t in args.teachers for s in args.sizes},
                    'seconds': round(time.time() - start, 1)}))


if __name__ == '__main__':
  main()
