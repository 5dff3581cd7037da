"""What a loop writes beside its stages' runs: per-round (or per-generation) summaries and the
loop's own metrics.jsonl, each replaced atomically so a killed loop never leaves half a file.
In a multi-process run process 0 alone writes; a loop has the others wait at a barrier
(distributed.barrier) before they read what it wrote."""
import json
import os

from rlhf_jax import distributed


def write_json(path: str, value) -> None:
  if not distributed.is_primary():
    return
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + '.tmp', 'w') as f:
    json.dump(value, f, indent=2)
  os.replace(path + '.tmp', path)


def write_metrics(workdir: str, rows: list[dict]) -> None:
  """DIR/metrics.jsonl, one line per row, rewritten whole (a resumed loop re-derives it
  from its summaries); a row's `lineage` stays in its summary only."""
  if not distributed.is_primary():
    return
  path = os.path.join(workdir, 'metrics.jsonl')
  with open(path + '.tmp', 'w') as f:
    for row in rows:
      f.write(json.dumps({k: v for k, v in row.items() if k != 'lineage'}) + '\n')
  os.replace(path + '.tmp', path)


def table(rows: list[dict], *, label: str, cols, width: int = 13) -> str:
  """A text table of rows by their `step` (headed `label`); cols are (header, metric key,
  format) triples, '-' where a row lacks the key."""
  lines = [f'{label:<7}' + ''.join(f'{name:>{width}}' for name, _, _ in cols)]
  for row in rows:
    cells = [fmt.format(row[key]) if key in row else '-' for _, key, fmt in cols]
    lines.append(f'{row["step"]:<7}' + ''.join(f'{c:>{width}}' for c in cells))
  return '\n'.join(lines)
