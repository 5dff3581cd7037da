r"""Model-collapse curves: schedules x seeds, every metric against generation.

  python experiments/model_collapse.py                        # 2 minutes; OUT=runs/model_collapse
  python experiments/model_collapse.py --text=/usr/share/games/fortunes --vocab_size=1000
  python experiments/model_collapse.py --model=transformer --seeds=2   # the CLI loop, slow

By default each (engine, schedule, seed) is a bigram model of the `tiny` world retrained on
its own samples for `--generations` generations (rlhf_jax/loops/collapse_bigram.py), all
seeds of an (engine, schedule) in one `jit(vmap(...))`. `--engines` (default mle,adam): mle
is the textbook exact maximum-likelihood refit, counts / row total, under which a
transition no generation samples is gone for good (its true KL and perplexity are +inf:
the held-out data make transitions it has lost); adam is the smoothed fit of a logit table
by `--train_steps` Adam steps at `--lr`, under which every transition keeps some mass.
`--text PATH` does the same on a local text corpus (a file or folder; binary files such as
the `.dat` indexes beside Debian's fortunes are skipped, `%` lines split fortunes into
documents): a sentencepiece tokenizer is trained on it in OUT, its documents are the real
rows, and there is no true KL. `--model=transformer`
runs the Transformer loop (configs/collapse.py:tiny, `python -m rlhf_jax.main` in-process)
per schedule and seed instead, in OUT/transformer/<schedule>_seed<s> (resumable).

Writes OUT/collapse.csv (engine, schedule, seed, generation, metrics), OUT/collapse.png
(each metric against generation, mean and 95% band over seeds, one colour per schedule, one
line style per engine), OUT/theory.png and
OUT/theory.csv (the exact-theory companions: iterated Gaussian fitting and linear regression
on its own labels, simulation next to closed form), and prints a summary table.
"""
import argparse
import csv
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from rlhf_jax.analysis import collapse_metrics as cm  # noqa: E402
from rlhf_jax.analysis import collapse_theory as ct  # noqa: E402
from rlhf_jax.config import load_named  # noqa: E402
from rlhf_jax.errors import UserError  # noqa: E402
from rlhf_jax.loops import collapse_bigram as cb  # noqa: E402
from rlhf_jax.world import language  # noqa: E402

METRICS = ('true_kl', 'perplexity', 'tail_mass', 'tail_min_mass', 'tail_survival',
           'tail_support', 'sample_distinct_1', 'sample_distinct_2', 'sample_unigram_entropy',
           'data_distinct_2', 'data_unigram_entropy')
SUMMARY = ('true_kl', 'perplexity', 'tail_mass', 'tail_min_mass', 'tail_survival',
           'tail_support', 'sample_distinct_2', 'sample_unigram_entropy')


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--out', default='runs/model_collapse')
  p.add_argument('--schedules', default='replace,accumulate,mix')
  p.add_argument('--engines', default='mle,adam',
                 help=f'bigram engines, from {tuple(cb.ENGINES)}')
  p.add_argument('--seeds', type=int, default=8)
  p.add_argument('--generations', type=int, default=10)
  p.add_argument('--samples', type=int, default=None,
                 help='rows per generation (default: 256 for bigram, the config\'s 1024 for '
                      'transformer)')
  p.add_argument('--seq_len', type=int, default=64, help='tokens per row after BOS')
  p.add_argument('--temperature', type=float, default=1.0)
  p.add_argument('--mix_fraction', type=float, default=0.5)
  p.add_argument('--init', default='scratch', choices=cb.INITS, help='adam engine only')
  p.add_argument('--train_steps', type=int, default=cb.CollapseSpec.train_steps,
                 help='adam engine only')
  p.add_argument('--lr', type=float, default=cb.CollapseSpec.lr, help='adam engine only')
  p.add_argument('--text', default='', help='a local text file or folder instead of the world')
  p.add_argument('--vocab_size', type=int, default=1000, help='tokenizer size for --text')
  p.add_argument('--model', default='bigram', choices=('bigram', 'transformer'))
  p.add_argument('--theory_seeds', type=int, default=4000)
  return p.parse_args(argv)


def real_tables(args):
  """(RealData, vocab size, held-out counts, true log-probs or None, tail) for the engine."""
  width = args.seq_len + 1
  if not args.text:
    lang = language.from_block(load_named('collapse', 'tiny').world)
    heldout = language.sample(lang, key=jax.random.key(0xC012), batch_size=4096,
                              seq_len=width)
    return (cb.RealData.world(lang), lang.vocab_size,
            cm.bigram_counts(heldout, vocab_size=lang.vocab_size), cm.true_logp_table(lang),
            cm.world_tail(lang))
  from rlhf_jax.data import collapse_data
  from rlhf_jax.data.sources import make_source
  config = load_named('collapse', 'tiny')
  config.data.update(source=f'text:{os.path.abspath(args.text)}', vocab_size=args.vocab_size)
  config.train.seq_len = args.seq_len
  source = make_source(config, workdir=os.path.join(args.out, 'tokenizer'))
  real = collapse_data.text_real_data(source, width=width, min_heldout=1)
  v = real.vocab_size
  print(f'text: {len(real.train)} training and {len(real.heldout)} held-out documents, '
        f'vocab {v}; {source.stats["skipped_files"]} files skipped as not text', flush=True)
  train_counts = cm.bigram_counts(jnp.asarray(real.train), vocab_size=v)
  return (cb.RealData.text(real.train), v, cm.bigram_counts(jnp.asarray(real.heldout),
                                                            vocab_size=v),
          None, cm.text_tail(np.asarray(train_counts)))


def bigram_spec(args, engine: str, schedule: str) -> cb.CollapseSpec:
  return cb.CollapseSpec(generations=args.generations, engine=engine,
                         samples=args.samples or 256, seq_len=args.seq_len + 1,
                         schedule=schedule, mix_fraction=args.mix_fraction,
                         temperature=args.temperature, init=args.init,
                         train_steps=args.train_steps, lr=args.lr)


def bigram_rows(spec: cb.CollapseSpec, args, tables) -> list[dict]:
  real, vocab, heldout, true_logp, tail = tables
  run = cb.make_collapse(spec, vocab_size=vocab, real=real, heldout_counts=heldout,
                         true_logp=true_logp, tail=tail)
  keys = jax.random.split(jax.random.key(0), args.seeds)
  trace = jax.block_until_ready(jax.jit(jax.vmap(run))(keys))
  return cb.trace_to_rows(trace)


def transformer_rows(args, schedule: str) -> list[dict]:
  from rlhf_jax.stages import dispatch
  rows = []
  for seed in range(args.seeds):
    config = load_named('collapse', 'tiny')
    config.seed = seed
    config.train.progress = False
    config.collapse.update(schedule=schedule, generations=args.generations,
                           samples=args.samples or config.collapse.samples,
                           temperature=args.temperature, mix_fraction=args.mix_fraction,
                           init=args.init)
    if args.text:
      config.data.update(source=f'text:{os.path.abspath(args.text)}',
                         vocab_size=args.vocab_size)
    workdir = os.path.join(args.out, 'transformer', f'{schedule}_seed{seed}')
    dispatch.run(config, workdir)
    for line in open(os.path.join(workdir, 'metrics.jsonl')):
      r = json.loads(line)
      row = {'seed': seed, 'generation': r['step']}
      row.update({k.removeprefix('collapse/'): v for k, v in r.items()
                  if k.startswith('collapse/') and not k.startswith('collapse/real_')})
      rows.append(row)
  return rows


def theory(args) -> list[dict]:
  """Simulation (args.theory_seeds vmapped seeds) and closed form, for both toy recursions."""
  g, m, var0, sigma, dim, rows_t = args.generations, 10, 1.0, 1.0, 4, 24
  w_star = jnp.ones(dim)
  keys = jax.random.split(jax.random.key(1), args.theory_seeds)
  gaussian, regression, out = {}, {}, []
  for schedule in ct.SCHEDULES:
    fits = jax.jit(jax.vmap(ct.make_gaussian(mu0=0.0, var0=var0, samples=m, generations=g,
                                             schedule=schedule)))(keys)
    gaussian[schedule] = ct.Curve(
        values=np.asarray(fits.var), theory=ct.gaussian_expected_var(
            var0=var0, samples=m, generations=g, schedule=schedule),
        limit=ct.gaussian_var_limit(var0=var0, samples=m, schedule=schedule))
    fits = jax.jit(jax.vmap(ct.make_regression(w_star=w_star, rows=rows_t, sigma=sigma,
                                               generations=g, schedule=schedule)))(keys)
    regression[schedule] = ct.Curve(
        values=np.asarray(fits.error), theory=ct.regression_expected_error(
            sigma=sigma, dim=dim, rows=rows_t, generations=g, schedule=schedule),
        limit=ct.regression_error_limit(sigma=sigma, dim=dim, rows=rows_t, schedule=schedule))
    for name, curve in (('gaussian_var', gaussian[schedule]),
                        ('regression_error', regression[schedule])):
      mean, half = ct.mean_and_band(curve.values)
      for n in range(g):
        out.append({'quantity': name, 'schedule': schedule, 'generation': n + 1,
                    'simulated': mean[n], 'band95': half[n], 'theory': curve.theory[n]})
  ct.plot_theory(os.path.join(args.out, 'theory.png'), gaussian=gaussian,
                 regression=regression)
  return out


def write_csv(path: str, rows: list[dict]) -> None:
  with open(path, 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)


def by_generation(rows, metric) -> np.ndarray:
  """[S, G] values of `metric`."""
  seeds = sorted({r['seed'] for r in rows})
  gens = sorted({r['generation'] for r in rows})
  table = {(r['seed'], r['generation']): r.get(metric, np.nan) for r in rows}
  return np.array([[table[s, g] for g in gens] for s in seeds], np.float64)


def band(values: np.ndarray):
  """Mean over seeds [G] and the half-width of its 95% interval (Student's t, n - 1 df);
  an infinite mean (mle's true KL) has a NaN half-width."""
  import scipy.stats
  mean = values.mean(0)
  n = len(values)
  with np.errstate(invalid='ignore'):
    half = (scipy.stats.t.ppf(0.975, n - 1) * values.std(0, ddof=1) / np.sqrt(n) if n > 1
            else np.zeros_like(mean))
  return mean, half


def plot(path: str, results: dict[tuple[str, str], list[dict]], metrics) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  cols = 4
  rows_ = -(-len(metrics) // cols)
  fig, axes = plt.subplots(rows_, cols, figsize=(4 * cols, 3.25 * rows_))
  schedules = list(dict.fromkeys(s for _, s in results))
  engines = list(dict.fromkeys(e for e, _ in results))
  for ax, metric in zip(axes.flat, metrics):
    for (engine, schedule), rows in results.items():
      mean, half = band(by_generation(rows, metric))
      gens = np.arange(len(mean))
      color = f'C{schedules.index(schedule)}'
      style = ('-o', '--s', ':^')[engines.index(engine) % 3]
      ax.plot(gens, mean, style, ms=3, color=color, label=f'{engine} {schedule}')
      ax.fill_between(gens, mean - half, mean + half, color=color, alpha=0.2)
    ax.set_title(metric)
    ax.set_xlabel('generation')
  for ax in list(axes.flat)[len(metrics):]:
    ax.axis('off')
  axes.flat[0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def summary(results: dict[tuple[str, str], list[dict]], metrics) -> str:
  lines = [f'{"engine":<12}{"schedule":<12}{"metric":<24}{"gen 0":>18}{"last gen":>18}']
  for (engine, schedule), rows in results.items():
    for metric in metrics:
      mean, half = band(by_generation(rows, metric))
      cell = lambda i: f'{mean[i]:.4f} ± {half[i]:.4f}'
      lines.append(f'{engine:<12}{schedule:<12}{metric:<24}{cell(0):>18}{cell(-1):>18}')
  return '\n'.join(lines)


def main(argv=None) -> None:
  args = parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  schedules = [s for s in args.schedules.split(',') if s]
  unknown = [s for s in schedules if s not in cb.SCHEDULES]
  if unknown or not schedules:
    raise UserError(f'--schedules: {unknown or "none"} not in {tuple(cb.SCHEDULES)}')
  if args.seeds < 1:
    raise UserError('--seeds must be >= 1')
  if args.model == 'bigram':
    engines = [e for e in args.engines.split(',') if e]
    unknown = [e for e in engines if e not in cb.ENGINES]
    if unknown or not engines:
      raise UserError(f'--engines: {unknown or "none"} not in {tuple(cb.ENGINES)}')
    # Every spec is checked before any compute.
    runs = {(e, s): bigram_spec(args, e, s) for e in engines for s in schedules}
  else:
    runs = {('transformer', s): None for s in schedules}
  t0 = time.perf_counter()
  tables = real_tables(args) if args.model == 'bigram' else None
  results = {}
  for (engine, schedule), spec in runs.items():
    results[engine, schedule] = (bigram_rows(spec, args, tables) if spec is not None
                                 else transformer_rows(args, schedule))
    print(f'{engine} {schedule}: done ({time.perf_counter() - t0:.0f} s)', flush=True)
  # Metrics a run does not have (true KL on text; the tail metrics of the Transformer
  # loop, survival and min mass on text) are NaN throughout and left out.
  metrics = [m for m in METRICS
             if any(not np.isnan(by_generation(rows, m)).all() for rows in results.values())]
  write_csv(os.path.join(args.out, 'collapse.csv'),
            [{'engine': e, 'schedule': s, **r} for (e, s), rows in results.items()
             for r in rows])
  plot(os.path.join(args.out, 'collapse.png'), results, metrics)
  write_csv(os.path.join(args.out, 'theory.csv'), theory(args))
  print(summary(results, [m for m in SUMMARY if m in metrics]))
  print(f'wrote {args.out}/collapse.csv, collapse.png, theory.csv, theory.png '
        f'({time.perf_counter() - t0:.0f} s)')


if __name__ == '__main__':
  try:
    main()
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
