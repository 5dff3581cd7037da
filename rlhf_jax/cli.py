"""Helpers shared by the command-line tools: flag parsing under the bad-input contract."""
import sys

from absl import flags


def parse_flags_or_exit(argv: list[str]) -> None:
  """absl flag parsing with the project's bad-input contract: one `error:` line, exit 2."""
  try:
    flags.FLAGS(argv)
  except flags.Error as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


def config_name(argv: list[str], default: str = 'configs/pretrain.py:small') -> str:
  """The --config argument as given, for the figures line."""
  return next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), default)
