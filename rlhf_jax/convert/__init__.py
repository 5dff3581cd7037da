"""Hugging Face checkpoints in and out: `python -m rlhf_jax.convert` (see __main__.py)."""
