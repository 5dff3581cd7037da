"""The distill stage (issue 22) against independent computations.

In-process (marked slow: each compiles a step or a model, 6-13 s): a student equal to its
teacher has zero loss and zero gradient in the whole train step, on- and off-policy; the
`ce` baseline on the world's rows is exactly pretraining's loss on the same sequences; the
evaluator's two KLs equal float64 NumPy on logits of unpadded rows. Quick: config checks.
From the CLI (slow, the session's pretraining run as the teacher): kd lowers the student's
true KL below the same student's on the same number of real tokens; the teacher's true KL
is the one its own run measured; a run stopped part-way continues to the same numbers; bad
teachers are one error line.
"""
import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
from flax import linen as nn
import ml_collections
import numpy as np
import pytest
from conftest import _run_stage

from rlhf_jax import config as config_lib
from rlhf_jax.data.batch import from_rows
from rlhf_jax.data.preferences import world_prompts
from rlhf_jax.errors import UserError
from rlhf_jax.models.transformer import ModelConfig, Transformer
from rlhf_jax.stages import distill_eval
from rlhf_jax.train import distill_step, lm_step
from rlhf_jax.train.state import TrainState, make_optimizer, make_schedule
from rlhf_jax.world import language

VOCAB, N = 64, 12


def _lang():
  return language.make_language(seed=0, vocab_size=VOCAB, branching=8, zipf_a=1.1,
                                eos_prob=0.05)


def _model(d_model=32, n_layers=1, seed=0):
  cfg = config_lib.model_block()
  cfg.update(vocab_size=VOCAB, d_model=d_model, n_layers=n_layers, n_heads=2, d_ff=64)
  model = Transformer(ModelConfig.from_config(cfg))
  dummy = jnp.ones((1, 8), jnp.int32)
  # Jitted, from an RBG key: op by op, or compiling threefry's draws, takes seconds.
  init = jax.jit(lambda key: model.init(key, dummy, segment_ids=dummy, positions=dummy))
  return model, nn.meta.unbox(init(jax.random.key(seed, impl='rbg'))['params'])


def _step_config(loss, *, data='world', on_policy=0, **kw):
  return distill_step.StepConfig(loss=loss, data=data, on_policy_rows=on_policy,
                                 max_new_tokens=N, temperature=kw.get('temperature', 1.0),
                                 alpha=1.0, beta=kw.get('beta', 0.5), top_k=kw.get('top_k', 0),
                                 sample_temperature=1.0)


def _prompts(num=8):
  return world_prompts(_lang(), key=jax.random.key(3), num=num, max_len=4)


@pytest.mark.slow  # compiles the step or the model: over the quick check's 5 s
@pytest.mark.parametrize('loss,data,on_policy,extra', [
    ('kd', 'world', 0, {'temperature': 2.0}), ('gkd', 'teacher', 4, {'beta': 0.9, 'top_k': 5})])
def test_student_equal_to_its_teacher_has_zero_loss_and_gradient(loss, data, on_policy, extra):
  model, params = _model()
  _, other = _model(seed=1)
  tx = make_optimizer(config_lib.optim_block(), 10)
  prompts, lengths = _prompts()
  if data == 'world':  # world rows follow BOS alone, as the stage's prompts are then
    prompts, lengths = prompts[:, -1:] * 0 + language.BOS_ID, lengths * 0 + 1
  batch = {'prompts': jnp.asarray(prompts), 'prompt_lengths': jnp.asarray(lengths)}
  frozen = distill_step.Frozen(teacher_params=params, lang=_lang())
  step = jax.jit(lambda state, frozen, batch: distill_step.train_step(
      state, frozen, batch, model=model, teacher=model, tx=tx,
      schedule=make_schedule(config_lib.optim_block(), 10),
      config=_step_config(loss, data=data, on_policy=on_policy, **extra)))
  metrics = {}
  for name, start in (('same', params), ('other', other)):
    state = TrainState(step=jnp.int32(0), params=start, opt_state=tx.init(start),
                       rng=jax.random.key_data(jax.random.key(7)))
    _, metrics[name] = jax.device_get(step(state, frozen, batch))
  assert abs(metrics['same']['train/loss']) < 1e-6
  assert metrics['same']['train/grad_norm'] < 1e-5
  # Not trivially zero: another student of the same size is four orders of magnitude off.
  assert metrics['other']['train/loss'] > 1e-2 and metrics['other']['train/grad_norm'] > 1e-3


@pytest.mark.slow  # compiles the step or the model: over the quick check's 5 s
def test_ce_on_world_rows_is_pretraining_on_the_same_sequences():
  model, params = _model()
  lang, key = _lang(), jax.random.key(11)
  rows = distill_step.world_rows(lang, key, num=16, width=N)
  ours = distill_step.loss_of(params, rows, None, model=model, config=_step_config('ce'))
  # Pretraining's batch of the very same true sequences (language.sample of N + 1 tokens).
  seqs = np.asarray(language.sample(lang, key=key, batch_size=16, seq_len=N + 1))
  batch = from_rows(seqs, pad_id=language.PAD_ID)
  loss_sum, (count, _) = lm_step._xent(params, batch, model)
  assert float(rows.mask.sum()) == float(count) > 16
  np.testing.assert_allclose(float(ours), float(loss_sum / count), rtol=1e-6)


def _numpy_logits(model, params, prompt, response):
  """float64 logits [N, V] predicting response after one unpadded prompt (its own forward)."""
  tokens = np.concatenate([prompt, response[:-1]])[None].astype(np.int32)
  out = model.apply({'params': params}, tokens, segment_ids=np.ones_like(tokens),
                    positions=np.arange(tokens.shape[1], dtype=np.int32)[None])
  return np.asarray(out.logits[0, len(prompt) - 1:], np.float64)


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.slow  # compiles the step or the model: over the quick check's 5 s
def test_the_evaluators_kls_are_numpys_on_unpadded_rows():
  student, s_params = _model()
  teacher, t_params = _model(d_model=48, n_layers=2, seed=5)  # a bigger model, its own shape
  prompts, lengths = _prompts(num=4)
  rng = np.random.default_rng(0)
  response = rng.integers(3, VOCAB, (4, N)).astype(np.int32)
  mask = (np.arange(N)[None] < rng.integers(1, N + 1, (4, 1))).astype(np.float32)
  kl_sums = jax.jit(functools.partial(distill_eval._kl_sums, student=student, teacher=teacher))
  reverse, forward, count = jax.device_get(kl_sums(
      s_params, t_params, jnp.asarray(prompts), jnp.asarray(lengths), jnp.asarray(response),
      jnp.asarray(mask)))
  assert len(set(lengths)) > 1  # left padding of several widths
  want_rev = want_fwd = 0.0
  for row in range(4):
    prompt = prompts[row, prompts.shape[1] - lengths[row]:]
    q = _log_softmax(_numpy_logits(student, s_params, prompt, response[row]))
    p = _log_softmax(_numpy_logits(teacher, t_params, prompt, response[row]))
    want_rev += ((np.exp(q) * (q - p)).sum(-1) * mask[row]).sum()
    want_fwd += ((np.exp(p) * (p - q)).sum(-1) * mask[row]).sum()
  assert count == mask.sum()
  np.testing.assert_allclose([reverse, forward], [want_rev, want_fwd], rtol=2e-5)


@pytest.mark.parametrize('fields,message', [
    (dict(loss='seq_kd'), "set distill.data='teacher'"),
    (dict(loss='ce', data='teacher'), "set distill.data='world'"),
    (dict(loss='ce', on_policy_fraction=0.5), 'learns from given tokens only'),
    (dict(alpha=0.5, on_policy_fraction=0.5), 'use alpha=1 on-policy'),
    (dict(loss='gkd', beta=1.5), r'distill.beta=1.5 must be in \[0, 1\]'),
    (dict(loss='jsd'), 'is not one of'),
    (dict(temperature=0.0), 'distill.temperature=0.0 must be > 0'),
    (dict(teacher_top_k=-1), 'teacher_top_k=-1 must be >= 0')])
def test_config_checks(fields, message):
  config = config_lib.load_named('distill', 'tiny')
  config.distill.update(**fields)
  with pytest.raises(UserError, match=message):
    config_lib.validate(config)


# --- from the CLI, on the session's pretraining run -------------------------------------

def _metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope='module')
def pair(chain, tmp_path_factory):
  """kd and ce students of the chain's pretraining run, 100 steps each, checkpoint at 50."""
  root = tmp_path_factory.mktemp('distill')
  args = {}
  for name in ('kd', 'ce'):
    variant = 'tiny' if name == 'kd' else 'tiny_scratch'
    args[name] = (f'configs/distill.py:{variant}', str(root / name),
                  f'--config.distill.teacher_run={chain["pretrain"]}',
                  '--config.train.steps=100', '--config.train.eval_every=100',
                  '--config.train.ckpt_every=50')
    _run_stage(*args[name])
  return {'root': root, 'args': args, 'kd': _metrics(root / 'kd'), 'ce': _metrics(root / 'ce')}


def test_kd_beats_the_same_student_on_the_same_real_tokens(pair, chain):
  kd, ce = pair['kd'], pair['ce']
  # The same fresh student at step 0, scored on the same fresh true sequences.
  assert kd[0]['eval/true_kl'] == ce[0]['eval/true_kl'] > 2.0
  assert kd[-1]['step'] == ce[-1]['step'] == 100
  # The teacher's true KL is the one its own pretraining run measured on that eval stream.
  teacher = [r for r in _metrics(chain['pretrain']) if 'eval/true_kl' in r][-1]
  assert abs(kd[0]['distill/teacher_true_kl'] - teacher['eval/true_kl']) < 1e-5
  gap = ((ce[-1]['eval/true_kl'] - kd[-1]['eval/true_kl'])
         / (ce[-1]['eval/true_kl'] - teacher['eval/true_kl']))
  assert kd[-1]['eval/true_kl'] < 0.85 * ce[-1]['eval/true_kl'] and gap > 0.15, gap
  assert kd[-1]['distill/kl_from_teacher'] < ce[-1]['distill/kl_from_teacher']


def test_stopped_run_continues_to_the_same_numbers(pair):
  """As if killed after its checkpoint at step 50: the rerun redraws steps 51-100."""
  workdir = pair['root'] / 'kd'
  shutil.rmtree(workdir / 'checkpoints' / '100')
  _run_stage(*pair['args']['kd'])
  strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith('perf/')}
                        for r in rows]
  assert strip(_metrics(workdir)) == strip(pair['kd'])


def test_bad_teachers_are_one_error_line(chain, run_cli, tmp_path):
  other = tmp_path / 'other_vocab'
  other.mkdir()
  config = ml_collections.ConfigDict(json.load(open(os.path.join(chain['pretrain'],
                                                                 'config.json'))))
  config.model.vocab_size = 32
  config.world.vocab_size = 32
  (other / 'config.json').write_text(config.to_json())
  cases = [(f'--config.distill.teacher_run={tmp_path / "missing"}', 'holds no run'),
           (f'--config.distill.student_run={other}', 'has a vocabulary of 32 tokens')]
  for i, (arg, message) in enumerate(cases):
    workdir = tmp_path / f'run{i}'
    result = run_cli('--config=configs/distill.py:tiny', f'--workdir={workdir}',
                     f'--config.distill.teacher_run={chain["pretrain"]}', arg)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith('error: ') and message in lines[0], lines
    assert not os.path.exists(workdir / 'config.json')
