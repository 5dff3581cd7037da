"""Documents from local text files, the `text:PATH` data source.

PATH is one file or a folder; a folder is read recursively in sorted path order
so the same folder always gives the same documents in the same order. Names
starting with `.` (`.git`, `.DS_Store`, editor swap files) are ignored.

A file is skipped, and reported, when it is clearly not text: a NUL byte in its
first 8 KiB, or more than 30% of its bytes invalid UTF-8. This keeps index files
such as the `.dat` files beside Debian's fortune cookies out of the corpus. A
symbolic link to a file already read (fortune's `name.u8 -> name`) is skipped
too, so no text is counted twice.

Other invalid UTF-8 bytes are replaced by U+FFFD and counted, so a run can say
how much of its corpus was damaged rather than failing on one stray byte.

Document rule: a file is one document, except that a line holding only `%`
(the fortune format), or a run of two or more blank lines, ends the current
document. A single blank line is a paragraph break and stays inside the
document. Line ends are normalised to `\\n`, blank lines around a document are
dropped, and empty documents are discarded.
"""
import dataclasses
import os

from rlhf_jax.errors import UserError

_SNIFF_BYTES = 8192
# Beyond this share of undecodable bytes a file is a binary or a different
# encoding; training a tokenizer on its replacement characters helps nobody.
_MAX_INVALID_FRACTION = 0.3


@dataclasses.dataclass(frozen=True)
class TextDocuments:
  """What `read_text_documents` found.

  documents:              the documents, in file order then order inside a file.
  files_read:             paths of the files the documents came from.
  invalid_bytes_replaced: invalid UTF-8 bytes replaced by U+FFFD in those files.
  skipped_files:          `(path, reason)` for every file left out.
  """
  documents: list[str]
  files_read: list[str]
  invalid_bytes_replaced: int
  skipped_files: list[tuple[str, str]]


def decode_utf8_counting(*, data: bytes) -> tuple[str, int]:
  """Decodes UTF-8 with replacement; returns the text and the bytes replaced."""
  text = data.decode('utf-8', errors='replace')
  # 'ignore' drops exactly the byte spans that 'replace' replaces, and valid
  # UTF-8 re-encodes to itself, so the length difference is the bad-byte count.
  kept = len(data.decode('utf-8', errors='ignore').encode('utf-8'))
  return text, len(data) - kept


def split_documents(*, text: str) -> list[str]:
  """Splits one file's text into documents by the rule in the module docstring."""
  documents = []
  current = []
  blank_run = 0

  def flush():
    while current and not current[-1].strip():
      current.pop()
    if current:
      documents.append('\n'.join(current))
    current.clear()

  for line in text.replace('\r\n', '\n').split('\n'):
    if line.rstrip() == '%':
      flush()
      blank_run = 0
    elif not line.strip():
      blank_run += 1
      if current:  # Leading blank lines of a document are dropped.
        current.append(line)
    else:
      if blank_run >= 2:
        flush()
      blank_run = 0
      current.append(line)
  flush()
  return documents


def _list_files(root: str) -> list[str]:
  paths = []
  for dirpath, dirnames, filenames in os.walk(root):
    # Pruning in place keeps os.walk out of hidden folders such as .git.
    dirnames[:] = [d for d in dirnames if not d.startswith('.')]
    for name in filenames:
      if not name.startswith('.'):
        paths.append(os.path.join(dirpath, name))
  return sorted(paths)


def _why_not_text(data: bytes, invalid: int) -> str | None:
  if b'\x00' in data[:_SNIFF_BYTES]:
    return 'binary (NUL byte in the first 8 KiB)'
  if data and invalid > _MAX_INVALID_FRACTION * len(data):
    return f'not UTF-8 text ({invalid} of {len(data)} bytes invalid)'
  return None


def read_text_documents(*, path: str) -> TextDocuments:
  """Reads the documents under `path` (a file or a folder, see module doc)."""
  if not path:
    raise UserError('text: data source needs a path, as in text:/path/to/corpus')
  if not os.path.exists(path):
    raise UserError(f'text data path does not exist: {path}')
  single_file = not os.path.isdir(path)
  candidates = [path] if single_file else _list_files(path)

  documents, files_read, skipped = [], [], []
  invalid_total = 0
  seen_real_paths = {}
  for file_path in candidates:
    if not os.path.isfile(file_path):  # Sockets, fifos, dangling links.
      skipped.append((file_path, 'not a regular file'))
      continue
    real_path = os.path.realpath(file_path)
    if real_path in seen_real_paths:
      skipped.append((file_path, f'same file as {seen_real_paths[real_path]}'))
      continue
    seen_real_paths[real_path] = file_path
    try:
      with open(file_path, 'rb') as f:
        data = f.read()
    except OSError as e:
      if single_file:
        raise UserError(f'cannot read text data file {path}: {e.strerror}') from e
      skipped.append((file_path, f'unreadable ({e.strerror})'))
      continue
    text, invalid = decode_utf8_counting(data=data)
    reason = _why_not_text(data, invalid)
    if reason is not None:
      skipped.append((file_path, reason))
      continue
    invalid_total += invalid
    files_read.append(file_path)
    documents.extend(split_documents(text=text))

  if not documents:
    detail = f'; skipped {len(skipped)} non-text file(s)' if skipped else ''
    raise UserError(f'no text documents found in {path}{detail}')
  return TextDocuments(
      documents=documents,
      files_read=files_read,
      invalid_bytes_replaced=invalid_total,
      skipped_files=skipped,
  )
