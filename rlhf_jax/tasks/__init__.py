"""Tasks whose answers a program checks, chosen by `task.name` from a small registry.

A Task (tasks/base.py) makes prompts with known answers (`make_prompts`), reads the final
answer a response states (`extract`), grades it (`verify`, pure jnp and jittable) and
writes solved traces for a warm-start SFT (`solutions`). The world tasks (world_tasks.py:
sum_mod, sort, lookup) work on the world's token ids; the text tasks work on a
tokenizer's.
"""
from rlhf_jax.errors import UserError
from rlhf_jax.tasks import text_tasks, world_tasks
from rlhf_jax.tasks.base import Task, TaskBatch

# name -> build(task_config, *, vocab_size, tokenizer) -> Task, raising UserError for bad
# sizes. A task module exports its BUILDERS and joins here with one line; the text
# tasks (text_tasks.py: 'arithmetic_text', 'jsonl') are added the same way.
_BUILDERS = {
    **world_tasks.BUILDERS,
    **text_tasks.BUILDERS,
}


def names() -> tuple[str, ...]:
  return tuple(sorted(_BUILDERS))


def make_task(task_config, *, vocab_size: int, tokenizer=None) -> Task:
  """The task `task_config.name` with the sizes the config gives. vocab_size: the model's
  vocabulary (the world's for the world tasks); tokenizer: for the text tasks."""
  name = task_config.name
  if name not in _BUILDERS:
    raise UserError(f'task.name={name!r} is not one of {names()}')
  return _BUILDERS[name](task_config, vocab_size=vocab_size, tokenizer=tokenizer)


def validate(task_config, *, world_vocab_size: int) -> None:
  """The checks config.validate runs before any compute: a known name, and for a world
  task its sizes against the world's vocabulary (building one is cheap). A text task's
  sizes depend on its tokenizer and are checked when make_task builds it."""
  if task_config.name not in _BUILDERS:
    raise UserError(f'task.name={task_config.name!r} is not one of {names()}')
  if task_config.name in world_tasks.BUILDERS:
    make_task(task_config, vocab_size=world_vocab_size)
  if task_config.name in text_tasks.BUILDERS:
    text_tasks.check_config(task_config)


__all__ = ['Task', 'TaskBatch', 'make_task', 'names', 'validate']
