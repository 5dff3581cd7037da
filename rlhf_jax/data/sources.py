"""`data.source` -> a data source: 'world', 'text:PATH' or 'tfds:NAME'.

Every source offers `vocab_size`, `tokenizer` (None for the world), `world` (the true
language, or None), `next_batch()`, `get_state()`/`set_state()` and `eval_batches()`.
"""
from rlhf_jax.errors import UserError


def make_source(config, *, workdir: str):
  t, d = config.train, config.data
  if d.source == 'world':
    from rlhf_jax.data.world_source import WorldSource
    return WorldSource(world=config.world, seed=config.seed, batch_size=t.batch_size,
                       seq_len=t.seq_len)
  if d.source.startswith(('text:', 'tfds:')):
    from rlhf_jax.data.corpus import make_corpus_source
    return make_corpus_source(
        source=d.source, workdir=workdir, seq_len=t.seq_len, batch_size=t.batch_size,
        seed=config.seed, vocab_size=d.vocab_size, eval_fraction=d.eval_fraction,
        tfds_split=d.tfds_split, tfds_eval_split=d.tfds_eval_split,
        tfds_data_dir=d.tfds_data_dir, text_key=d.text_key)
  raise UserError(f"data.source={d.source!r} is not one of 'world', 'text:PATH', 'tfds:NAME'")
