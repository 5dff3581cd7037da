"""A sentencepiece tokenizer trained locally and kept in the run's workdir.

The model file is written once and then only read, so a resumed run (or a later
stage reading the same workdir) tokenizes exactly as the first run did.

Special ids are fixed to PAD=0, BOS=1, EOS=2, UNK=3, the same ids the synthetic
world uses, so models and losses never need to know which source fed them.
Training options are chosen so that `decode(encode(x)) == x` for any string:
no normalisation, whitespace kept as is, newline as its own piece, and unknown
characters spelled out as UTF-8 bytes.
"""
from collections.abc import Iterable, Sequence
import io
import os

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from rlhf_jax.errors import UserError

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
MODEL_TYPES = ('unigram', 'bpe', 'char', 'word')

# Sentencepiece drops training sentences longer than this many bytes; texts are
# fed line by line, so only pathological lines are lost.
_MAX_SENTENCE_BYTES = 1 << 16


class Tokenizer:
  """Text <-> token ids through a loaded sentencepiece model."""

  def __init__(self, *, processor: spm.SentencePieceProcessor, model_path: str):
    self._sp = processor
    self.model_path = model_path
    self.vocab_size = processor.get_piece_size()
    self.pad_id = processor.pad_id()
    self.bos_id = processor.bos_id()
    self.eos_id = processor.eos_id()
    self.unk_id = processor.unk_id()

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text, out_type=int)

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """Same ids as `encode` on each text, in one call into the C++ library."""
    return self._sp.encode(list(texts), out_type=int)

  def decode(self, ids: Iterable[int]) -> str:
    # Special ids carry no text; dropping them lets callers decode padded rows.
    specials = (self.pad_id, self.bos_id, self.eos_id)
    return self._sp.decode([int(i) for i in ids if int(i) not in specials])

  def pieces(self) -> list[str]:
    """Each id's piece as sentencepiece spells it: U+2581 stands for a space, '<0xNN>'
    for a byte-fallback byte; ids 0..3 are the specials' names. Verifiers that read
    characters out of token ids build their tables from this."""
    return [self._sp.id_to_piece(i) for i in range(self.vocab_size)]


def _check_specials(model_path: str, processor: spm.SentencePieceProcessor):
  found = (processor.pad_id(), processor.bos_id(), processor.eos_id(),
           processor.unk_id())
  if found != (PAD_ID, BOS_ID, EOS_ID, UNK_ID):
    raise UserError(
        f'tokenizer {model_path} has PAD/BOS/EOS/UNK ids {found}, expected '
        f'{(PAD_ID, BOS_ID, EOS_ID, UNK_ID)}; use a fresh workdir')


def load_tokenizer(*, model_path: str) -> Tokenizer:
  """Loads a model file written by `train_or_load_tokenizer`."""
  try:
    processor = spm.SentencePieceProcessor(model_file=model_path)
  except (OSError, RuntimeError) as e:
    raise UserError(f'cannot load tokenizer {model_path}: {e}') from e
  _check_specials(model_path, processor)
  return Tokenizer(processor=processor, model_path=model_path)


def _check_trained_with(tokenizer: Tokenizer, vocab_size: int, model_type: str):
  """Refuses an existing model trained for a different config."""
  proto = sentencepiece_model_pb2.ModelProto()
  proto.ParseFromString(tokenizer._sp.serialized_model_proto())  # pylint: disable=protected-access
  spec = proto.trainer_spec
  found_type = sentencepiece_model_pb2.TrainerSpec.ModelType.Name(
      spec.model_type).lower()
  if (spec.vocab_size, found_type) != (vocab_size, model_type):
    raise UserError(
        f'tokenizer {tokenizer.model_path} was trained with '
        f'vocab_size={spec.vocab_size}, model_type={found_type}, but '
        f'vocab_size={vocab_size}, model_type={model_type} was asked for; '
        'use a fresh workdir')


def _asked_vocab_size(model_bytes: bytes, vocab_size: int) -> bytes:
  """The model with its trainer spec recording the vocab_size asked for. With
  hard_vocab_limit off, a small corpus gives fewer pieces and sentencepiece records that
  smaller number, so a resumed run asking the same size again was refused; the pieces
  themselves (get_piece_size) are untouched."""
  proto = sentencepiece_model_pb2.ModelProto()
  proto.ParseFromString(model_bytes)
  proto.trainer_spec.vocab_size = vocab_size
  return proto.SerializeToString()


def _training_lines(texts: Iterable[str]) -> list[str]:
  # Sentencepiece reads sentences, not documents: newlines are learnt as the
  # user-defined '\n' piece, so lines carry all the statistics it needs.
  return [line for text in texts for line in text.split('\n') if line.strip()]


def _spm_reason(error: Exception) -> str:
  # Messages look like 'INTERNAL: src/x.cc(638) [check] Human words.'
  message = str(error).strip()
  _, bracket, rest = message.rpartition('] ')
  return rest if bracket and rest else message


def train_or_load_tokenizer(
    *,
    texts: Iterable[str],
    model_path: str,
    vocab_size: int,
    model_type: str = 'unigram',
) -> Tokenizer:
  """Loads `model_path` if it exists, else trains on `texts` and saves it there.

  `texts` is only consumed when training. `vocab_size` is an upper bound: a
  small corpus yields fewer pieces rather than an error. The file appears
  atomically, so a killed run leaves either no model or a whole one.
  """
  if model_type not in MODEL_TYPES:
    raise UserError(
        f'unknown tokenizer model_type {model_type!r}; one of {MODEL_TYPES}')
  if os.path.exists(model_path):
    tokenizer = load_tokenizer(model_path=model_path)
    _check_trained_with(tokenizer, vocab_size, model_type)
    return tokenizer

  lines = _training_lines(texts)
  if not lines:
    raise UserError('cannot train a tokenizer: the training text is empty')
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=vocab_size,
        model_type=model_type,
        pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID, unk_id=UNK_ID,
        byte_fallback=True,
        hard_vocab_limit=False,
        user_defined_symbols=['\n'],
        normalization_rule_name='identity',
        remove_extra_whitespaces=False,
        character_coverage=1.0,
        max_sentence_length=_MAX_SENTENCE_BYTES,
        # One thread and every sentence, in order: the same text always
        # gives the same model, byte for byte.
        num_threads=1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
  except RuntimeError as e:
    raise UserError(
        f'cannot train a {model_type} tokenizer with vocab_size={vocab_size} '
        f'on {len(lines)} lines of text: {_spm_reason(e)}') from e

  model_bytes = _asked_vocab_size(model.getvalue(), vocab_size)
  directory = os.path.dirname(os.path.abspath(model_path))
  tmp_path = f'{model_path}.tmp-{os.getpid()}'
  try:
    os.makedirs(directory, exist_ok=True)
    with open(tmp_path, 'wb') as f:
      f.write(model_bytes)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp_path, model_path)
  except OSError as e:
    raise UserError(f'cannot write tokenizer {model_path}: {e.strerror}') from e
  processor = spm.SentencePieceProcessor(model_proto=model_bytes)
  _check_specials(model_path, processor)
  return Tokenizer(processor=processor, model_path=model_path)
