"""The pod memory table's figures (rlhf_jax/pod_memory.py) on a shape small enough to compile
here: XLA's argument bytes of the Transformer's train step on an 8-device fsdp x tensor mesh
against the closed form (params and two Adam moments, float32, over the devices they are
sharded on)."""
import pytest

from rlhf_jax import pod_memory


def test_lm_step_state_is_the_sharded_params_and_moments():
  shape = pod_memory.Shape('lm', 'pretrain.py:tiny', {
      'model.d_model': 128, 'model.n_layers': 2, 'model.n_heads': 4, 'model.d_ff': 512,
      'model.vocab_size': 256, 'mesh.data': 1, 'mesh.fsdp': 4, 'mesh.tensor': 2,
      'train.batch_size': 8, 'train.seq_len': 32}, pod='8 CPU devices', devices=8,
      hbm_gib=1.0)
  figures, cfg = pod_memory.lm_step(pod_memory.load(shape))
  params = cfg.num_params()  # closed form (ModelConfig.num_params)
  assert figures['params_b'] * 1e9 == pytest.approx(params, abs=0.5)
  d = cfg.d_model
  norms = (2 * cfg.n_layers + 1) * d  # the RMSNorm scales: not split over both axes
  state = figures['state'] * pod_memory.GIB
  # Every matrix split over all 8 devices, the norm scales at worst whole on each; then this
  # device's rows of the batch (2 of 8: at most 6 int32 or float32 arrays of 2 x 32), the
  # step counter and the rng key.
  batch = 6 * 2 * 32 * 4
  assert 12 * (params - norms) / 8 <= state <= 12 * (params - norms) / 8 + 12 * norms + batch + 64
  assert figures['temp'] > 0


def test_bad_rows_are_one_error_line(capsys):
  with pytest.raises(SystemExit) as e:
    pod_memory.main(['--rows=lm,tpu'])
  assert e.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: --rows='lm,tpu': choose from lm,ppo")
