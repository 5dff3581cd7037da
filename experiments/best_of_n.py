r"""Best-of-n sampling from the SFT policy under a reward model, and under gold as an
oracle: gold and proxy reward against KL, the x-axis of Gao et al. 2022.

  python experiments/best_of_n.py --sft_run=runs/sft_tiny --rm_run=runs/rm_tiny \
      --out=runs/best_of_n

For each of --prompts world prompts (drawn as stages/ppo.py's prompt_pool draws them, up
to 8 tokens, with --seed) the SFT policy samples max(--ns) candidates and --ref_samples
more reference samples (48 new tokens, temperature 1, all iid), once (with
--continuous_slots=S by continuous batching through S cache rows, with row keys: other
samples than the default static sampler's, so other numbers than below). Every sample is
scored by the proxy, the reward-model ensemble with each member centred by its
reward_norm.json and the members averaged (as ppo_step.proxy_reward scores PPO rollouts),
and by the gold reward. For each n the first n candidates of a prompt compete: the proxy
picks one and gold, as an oracle, picks one (rlhf_jax/analysis/best_of_n.py's `select`,
ties to the lower index). Reported per n, mean over prompts with a 95% interval
(1.96 standard errors):
  gold_of_proxy_best   gold reward of the proxy's pick (what the proxy buys, truly)
  proxy_of_proxy_best  proxy reward of the proxy's pick (what it seems to buy)
  gold_of_gold_best    gold reward of gold's pick (the most n samples can give)
  kl_bound             log n - (n-1)/n
  kl_proxy, kl_gold    KL(pi_bon || pi_sft) measured with the proxy's (gold's) per-prompt
                       reward CDF on the reference samples (`kl_estimate`; bias about
                       +1/(2M) for continuous rewards, tie-aware): the KL of the policy
                       that picks by the proxy (by gold)
n = 1 is the SFT policy itself (KL 0).
gold_fit_a, gold_fit_b in the JSON: least squares of gold_of_proxy_best(n) - its n = 1
value on d (a - b d), d = sqrt(kl_bound) (Gao et al.'s best-of-n form).

Writes OUT/best_of_n.csv and OUT/best_of_n.png (rewards against d), prints a table and,
last, a JSON line. Bad input (a missing run, n < 1, an --rm_run that is not a
reward_model run or learned another world) ends with `error: ...` and exit 2.

Runtime on a 2-core CPU with the defaults (256 prompts x (32 + 64) samples): 40 s, of
which 18 s is sampling the 24576 responses (mean length 15 tokens) and the rest start-up,
loading and compiling. Measured with the defaults on runs/sft_tiny and runs/rm_tiny (seed
0; gold / proxy of the proxy's pick, gold of gold's pick, KL measured with the proxy's CDF;
95% intervals about +-0.05, +-0.13, +-0.03, +-0.07..0.16):
    n   KL bound  KL proxy  gold|proxy-best  proxy|proxy-best  gold|gold-best
    1     0.000     0.000        0.322             0.096            0.322
    4     0.636     0.639        0.593             1.242            0.743
   32     2.497     2.374        0.776             2.351            1.033
The measured KL stays within its interval of the bound at every n; ties can only pull the
true KL below it: 11% of samples share their reward with another sample of their prompt
(repeated responses, 47% of them the immediate-EOS one, gold 0), and 2-6% of the kept
samples at n >= 2 are such repeats. Gold reward
still rises at n = 32, the proxy's pick taking 60-66% of the oracle's gain at every n; the
fit d (0.393 - 0.066 d) would peak near d = 3 (KL 8.9, n near 2e4), an extrapolation.
"""
import csv
import functools
import json
import math
import os
import sys
import time

from absl import app, flags, logging
import jax
import ml_collections
import numpy as np

from rlhf_jax import config as config_lib
from rlhf_jax import sampling, sharding
from rlhf_jax.analysis import best_of_n
from rlhf_jax.errors import UserError
from rlhf_jax.stages import ppo, reward_norm
from rlhf_jax.train import ppo_step, runs
from rlhf_jax.world import reward as reward_lib
from rlhf_jax.world import setup as world_setup

_SFT = flags.DEFINE_string('sft_run', 'runs/sft_tiny', 'SFT run: the reference policy.')
_RM = flags.DEFINE_string('rm_run', 'runs/rm_tiny', 'reward_model run: the proxy.')
_NS = flags.DEFINE_list('ns', ['1', '2', '4', '8', '16', '32'], 'Values of n.')
_PROMPTS = flags.DEFINE_integer('prompts', 256, 'World prompts.')
_REF = flags.DEFINE_integer('ref_samples', 64, 'Reference samples per prompt for the CDF (M).')
_OUT = flags.DEFINE_string('out', 'runs/best_of_n', 'Output directory.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the prompts and the samples.')
_SLOTS = flags.DEFINE_integer(
    'continuous_slots', 0, '0: the static sampler; > 0 (a multiple of the data-parallel '
    'size): continuous batching through that many cache rows, with row keys (other samples '
    'than 0 gives).')
PROMPT_LEN, MAX_NEW_TOKENS = 8, 48
SCORE_BATCH = 1024  # rows per reward-model forward (one compiled shape)
Z95 = 1.96


def parse_ns(values) -> list[int]:
  try:
    ns = sorted({int(v) for v in values})
  except ValueError:
    raise UserError(f'--ns={",".join(values)} must be integers') from None
  if not ns or ns[0] < 1:
    raise UserError(f'--ns={",".join(values)}: every n must be >= 1')
  return ns


def load_config() -> ml_collections.ConfigDict:
  """A PPO-shaped config so that stages/ppo.py's resolve (model and world from the SFT
  run, reward and annotators from the RM run, same-world check) and prompt_pool apply."""
  if _PROMPTS.value < 2 or _REF.value < 1:
    raise UserError(f'--prompts={_PROMPTS.value} must be >= 2 and --ref_samples='
                    f'{_REF.value} >= 1')
  config_lib.check_continuous_slots('--continuous_slots', _SLOTS.value)
  # Read here too so that a bad run is named by its flag, not by ppo's config field.
  runs.read_config(os.path.abspath(_SFT.value), role='--sft_run')
  stage = runs.read_config(os.path.abspath(_RM.value), role='--rm_run').get('stage')
  if stage != 'reward_model':
    raise UserError(f'--rm_run {_RM.value} is a {stage!r} run, not a reward_model run')
  config = config_lib.feedback_config('best_of_n')
  config.seed = _SEED.value
  config.init.run = _SFT.value
  config.ppo = ml_collections.ConfigDict(dict(reward='rm', rm_run=_RM.value, rm_step=-1,
                                              num_prompts=_PROMPTS.value,
                                              prompt_len=PROMPT_LEN))
  ppo.resolve(config)
  return config


def in_chunks(fn, *arrays, chunk: int) -> np.ndarray:
  """fn over rows of arrays, `chunk` rows at a time (the last chunk padded with its first
  row, so one shape compiles), concatenated on the host."""
  n = arrays[0].shape[0]
  parts = []
  for lo in range(0, n, chunk):
    rows = np.arange(lo, lo + chunk)
    rows = np.where(rows < n, rows, lo)
    parts.append(np.asarray(jax.device_get(fn(*(a[rows] for a in arrays))))[:n - lo])
  return np.concatenate(parts)


def sample_candidates(sft, prompts, lengths, *, per: int, mesh, mesh_config, seed: int,
                      continuous_slots: int = 0):
  """`per` samples of the SFT policy (a runs.load result) to each prompt [P, T], as host
  arrays [P * per, ...] (prompt-major), 48 new tokens at temperature 1."""
  sampler = sampling.Sampler(model=sft.model,
                             config=sampling.SampleConfig(max_new_tokens=MAX_NEW_TOKENS),
                             mesh=mesh, mesh_config=mesh_config,
                             param_shardings=sft.param_shardings,
                             continuous_slots=continuous_slots)
  key = jax.random.fold_in(jax.random.key(seed), 0xB0F)
  return sampler.sample_in_chunks(sft.params, np.repeat(prompts, per, axis=0),
                                  np.repeat(lengths, per), key)


def sample_and_score(config, ns: list[int]):
  """(proxy, gold) [P, max(ns) + M] rewards; the first max(ns) columns are candidates."""
  mesh = sharding.make_mesh(config.mesh)
  dp = sharding.data_parallel_size(mesh, config.mesh)
  world = world_setup.from_config(config)
  sft = runs.load(config.init.run, mesh=mesh, mesh_config=config.mesh, role='--sft_run')
  rm = runs.load_reward_model(config.ppo.rm_run, mesh=mesh, mesh_config=config.mesh,
                              role='--rm_run')
  # The reward model's own statistics (its held-out responses: the SFT policy's), checked
  # to be those of the checkpoint loaded.
  rm_norm = reward_norm.to_norm(reward_norm.read_rm(config.ppo.rm_run, step=rm.step,
                                                    members=rm.config.rm.ensemble,
                                                    role='--rm_run'), mode='mean')
  prompts, lengths = ppo.prompt_pool(config, world, dp)
  per = max(ns) + _REF.value
  t0 = time.time()
  out = sample_candidates(sft, prompts, lengths, per=per, mesh=mesh, mesh_config=config.mesh,
                          seed=_SEED.value, continuous_slots=_SLOTS.value)
  print(f'sampled {len(out.response)} responses in {time.time() - t0:.0f}s '
        f'(mean length {out.mask.sum(axis=1).mean():.1f})', flush=True)
  rows_p, rows_l = np.repeat(prompts, per, axis=0), np.repeat(lengths, per)
  score = jax.jit(functools.partial(ppo_step.proxy_reward, rm_model=rm.model))
  with sharding.activate(mesh, config.mesh):
    proxy = in_chunks(lambda *a: score(rm.params, rm_norm, *a), rows_p, rows_l,
                      out.response, out.mask, chunk=-(-SCORE_BATCH // dp) * dp)
  gold = np.asarray(reward_lib.gold_reward(world.gold, prompts=rows_p, prompt_mask=rows_p > 0,
                                           responses=out.response, response_mask=out.mask))
  shape = (len(prompts), per)
  return proxy.reshape(shape).astype(np.float64), gold.reshape(shape).astype(np.float64)


def ci95(x) -> tuple[float, float]:
  return float(x.mean()), float(Z95 * x.std(ddof=1) / math.sqrt(len(x)))


def tie_rate(rewards) -> float:
  """Fraction of samples whose reward equals another sample's of the same prompt."""
  s = np.sort(rewards, axis=1)
  eq = s[:, 1:] == s[:, :-1]
  dup = np.zeros_like(s, bool)
  dup[:, 1:] |= eq
  dup[:, :-1] |= eq
  return float(dup.mean())


def measure(proxy, gold, ns: list[int]) -> list[dict]:
  top = max(ns)
  cand_p, cand_g, ref_p, ref_g = proxy[:, :top], gold[:, :top], proxy[:, top:], gold[:, top:]
  rows = np.arange(len(proxy))
  records = []
  for n in ns:
    by_proxy = best_of_n.select(cand_p[:, :n])
    by_gold = best_of_n.select(cand_g[:, :n])
    kl_p = best_of_n.kl_estimate(rewards=cand_p[rows, by_proxy], ref_rewards=ref_p, n=n)
    kl_g = best_of_n.kl_estimate(rewards=cand_g[rows, by_gold], ref_rewards=ref_g, n=n)
    record = {'n': n, 'kl_bound': best_of_n.kl_bound(n),
              'd': math.sqrt(best_of_n.kl_bound(n)),
              'kl_proxy': kl_p.kl, 'kl_proxy_ci95': Z95 * kl_p.se,
              'kl_gold': kl_g.kl, 'kl_gold_ci95': Z95 * kl_g.se}
    for name, values in (('gold_of_proxy_best', cand_g[rows, by_proxy]),
                         ('proxy_of_proxy_best', cand_p[rows, by_proxy]),
                         ('gold_of_gold_best', cand_g[rows, by_gold])):
      record[name], record[f'{name}_ci95'] = ci95(values)
    records.append(record)
  return records


def gao_fit(records: list[dict]) -> tuple[float, float]:
  """(a, b) of gold_of_proxy_best - its n = 1 value ~ d (a - b d), least squares."""
  base = next((r['gold_of_proxy_best'] for r in records if r['n'] == 1), None)
  points = [(r['d'], r['gold_of_proxy_best'] - base) for r in records if r['n'] > 1]
  if base is None or len(points) < 2:
    return math.nan, math.nan
  d, y = np.array(points).T
  (a, minus_b), *_ = np.linalg.lstsq(np.stack([d, d * d], axis=1), y, rcond=None)
  return float(a), float(-minus_b)


COLUMNS = ('n', 'd', 'kl_bound', 'kl_proxy', 'kl_proxy_ci95', 'kl_gold', 'kl_gold_ci95',
           'gold_of_proxy_best', 'gold_of_proxy_best_ci95', 'proxy_of_proxy_best',
           'proxy_of_proxy_best_ci95', 'gold_of_gold_best', 'gold_of_gold_best_ci95')


def summarize(records: list[dict], out: str, fit: tuple[float, float]) -> None:
  """Writes the csv and png; prints the table."""
  with open(os.path.join(out, 'best_of_n.csv'), 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(records)
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  d = np.array([r['d'] for r in records])
  fig, ax = plt.subplots(figsize=(6.5, 4.2))
  for name, label in (('gold_of_proxy_best', 'gold reward, best by proxy'),
                      ('proxy_of_proxy_best', 'proxy reward, best by proxy'),
                      ('gold_of_gold_best', 'gold reward, best by gold (oracle)')):
    mean = np.array([r[name] for r in records])
    half = np.array([r[f'{name}_ci95'] for r in records])
    ax.plot(d, mean, marker='o', label=label)
    ax.fill_between(d, mean - half, mean + half, alpha=0.2)
  if np.isfinite(fit).all() and records[0]['n'] == 1:
    grid = np.linspace(0, d.max(), 100)
    ax.plot(grid, records[0]['gold_of_proxy_best'] + grid * (fit[0] - fit[1] * grid), 'k--',
            lw=1, label=f'fit d(a - b d): a={fit[0]:.3f}, b={fit[1]:.3f}')
  for r in records:
    ax.annotate(f'n={r["n"]}', (r['d'], r['proxy_of_proxy_best']), textcoords='offset points',
                xytext=(0, 6), ha='center', fontsize=7)
  ax.set_xlabel('d = sqrt(log n - (n-1)/n)   [sqrt nats]')
  ax.set_ylabel('reward (mean over prompts, 95% band)')
  ax.set_title('Best-of-n from the SFT policy')
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(out, 'best_of_n.png'), dpi=120)

  print(f'\n{"n":>3} {"KL bound":>8} {"KL proxy":>15} {"KL gold":>15} '
        f'{"gold|proxy-best":>17} {"proxy|proxy-best":>17} {"gold|gold-best":>17}')
  for r in records:
    print(f'{r["n"]:>3} {r["kl_bound"]:>8.3f} '
          f'{r["kl_proxy"]:>7.3f} ± {r["kl_proxy_ci95"]:.3f} '
          f'{r["kl_gold"]:>7.3f} ± {r["kl_gold_ci95"]:.3f} '
          + ' '.join(f'{r[k]:>8.3f} ± {r[k + "_ci95"]:.3f}'
                     for k in ('gold_of_proxy_best', 'proxy_of_proxy_best',
                               'gold_of_gold_best')))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)  # orbax logs every restore at INFO
  start = time.time()
  try:
    ns = parse_ns(_NS.value)
    config = load_config()
    try:
      os.makedirs(_OUT.value, exist_ok=True)
    except OSError as e:
      raise UserError(f'--out {_OUT.value} cannot be created ({e})') from None
    proxy, gold = sample_and_score(config, ns)
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  records = measure(proxy, gold, ns)
  fit = gao_fit(records)
  summarize(records, _OUT.value, fit)
  top = max(ns)
  rnd = lambda key: [round(r[key], 4) for r in records]
  print(json.dumps({
      'prompts': proxy.shape[0], 'ref_samples': _REF.value, 'ns': ns,
      **{k: rnd(k) for k in COLUMNS[2:]},
      'gold_fit_a': round(fit[0], 4), 'gold_fit_b': round(fit[1], 4),
      'proxy_tie_rate': round(tie_rate(proxy), 4), 'gold_tie_rate': round(tie_rate(gold), 4),
      'sft_gold_reward': round(float(gold[:, top:].mean()), 4),
      'seconds': round(time.time() - start)}))


if __name__ == '__main__':
  app.run(main)
