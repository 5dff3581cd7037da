"""An imported checkpoint's own tokenizer, in our token ids.

Our code fixes the special ids: PAD 0, BOS 1, EOS 2, UNK 3 (data/tokenizer.py, the world).
A released checkpoint puts its specials anywhere (GPT-2's one special is 50256), so the
import permutes the vocabulary: `permutation(vocab, specials)[i]` is the checkpoint's id
of our token i, moving its EOS to our 2, and its BOS, PAD and UNK, where it has them and
they are distinct from the EOS, to our 1, 0 and 3 (each by swapping with the token that
sat there). The embedding rows and output columns are permuted the same way, so the model
computes exactly what it did, and the export undoes it.

A checkpoint without a distinct BOS (GPT-2) begins documents with its EOS, as it was
trained to: `bos_id` is then 2. Without a PAD, `pad_id` is the EOS too; padding is masked
by segment ids everywhere, so its token never matters.

The files are read from the run's `tokenizer/` folder: `tokenizer.json` through the
`tokenizers` package, else `tokenizer.model` through sentencepiece.
"""
import json
import os
from collections.abc import Iterable, Sequence

import numpy as np

from rlhf_jax.errors import UserError

FOLDER = 'tokenizer'
FILES = ('tokenizer.json', 'tokenizer.model', 'tokenizer_config.json',
         'special_tokens_map.json', 'generation_config.json')
ROLES = (('eos', 2), ('bos', 1), ('pad', 0), ('unk', 3))


def permutation(vocab_size: int, specials: dict) -> np.ndarray:
  """[vocab_size] int64: the checkpoint id of each of our ids (see module docstring)."""
  perm = np.arange(vocab_size)
  placed = set()
  for role, ours in ROLES:
    theirs = specials.get(role)
    if theirs is None or theirs in placed:
      continue
    if not 0 <= theirs < vocab_size:
      raise UserError(f'the {role} token id {theirs} is outside the vocabulary of '
                      f'{vocab_size}')
    j = int(np.flatnonzero(perm == theirs)[0])
    perm[ours], perm[j] = perm[j], perm[ours]
    placed.add(theirs)
  return perm


def our_ids(specials: dict) -> dict:
  """{'pad_id', 'bos_id', 'eos_id', 'unk_id'} in our ids for the checkpoint's specials."""
  eos = specials.get('eos')
  distinct = lambda role: specials.get(role) is not None and specials.get(role) != eos
  return {'eos_id': 2, 'bos_id': 1 if distinct('bos') else 2,
          'pad_id': 0 if distinct('pad') else 2,
          'unk_id': 3 if distinct('unk') and specials['unk'] not in (
              specials.get('bos'), specials.get('pad')) else None}


class HFTokenizer:
  """Text <-> our token ids through the checkpoint's tokenizer (Tokenizer's interface)."""

  def __init__(self, folder: str, *, vocab_size: int, specials: dict):
    self.model_path = folder
    self._perm = permutation(vocab_size, specials)
    self._ours = np.argsort(self._perm)
    self.vocab_size = vocab_size
    ids = our_ids(specials)
    self.pad_id, self.bos_id, self.eos_id, self.unk_id = (
        ids['pad_id'], ids['bos_id'], ids['eos_id'], ids['unk_id'])
    json_path = os.path.join(folder, 'tokenizer.json')
    if os.path.isfile(json_path):
      import tokenizers
      self._tok = tokenizers.Tokenizer.from_file(json_path)
      self._encode = lambda texts: [e.ids for e in self._tok.encode_batch(
          list(texts), add_special_tokens=False)]
      self._decode = lambda ids: self._tok.decode(ids, skip_special_tokens=False)
      self._piece = self._tok.id_to_token
    else:
      import sentencepiece as spm
      sp = spm.SentencePieceProcessor(model_file=os.path.join(folder, 'tokenizer.model'))
      self._encode = lambda texts: sp.encode(list(texts), out_type=int)
      self._decode = sp.decode
      self._piece = lambda i: sp.id_to_piece(i) if i < sp.get_piece_size() else None
    config = os.path.join(folder, 'tokenizer_config.json')
    self.chat_template, found = None, {}
    if os.path.isfile(config):
      with open(config) as f:
        found = json.load(f)
      self.chat_template = found.get('chat_template')
    # The texts a chat template prints as bos_token / eos_token (data/chat_template.py):
    # tokenizer_config.json's, else the piece of the special id ('' where there is none).
    for role in ('bos', 'eos'):
      token = found.get(f'{role}_token')
      token = token.get('content') if isinstance(token, dict) else token
      if not isinstance(token, str):
        theirs = specials.get(role)
        token = (self._piece(int(theirs)) or '') if theirs is not None else ''
      setattr(self, f'{role}_token', token)

  def encode(self, text: str) -> list[int]:
    return self.encode_batch([text])[0]

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    out = []
    for ids in self._encode(texts):
      ids = np.asarray(ids, np.int64)
      if len(ids) and ids.max() >= self.vocab_size:
        raise UserError(f'the tokenizer gave id {int(ids.max())}, outside the model\'s '
                        f'vocabulary of {self.vocab_size}')
      out.append(self._ours[ids].tolist())
    return out

  def decode(self, ids: Iterable[int]) -> str:
    specials = {self.pad_id, self.bos_id, self.eos_id}
    return self._decode([int(self._perm[int(i)]) for i in ids if int(i) not in specials])

  def pieces(self) -> list[str]:
    return [self._piece(int(self._perm[i])) or '' for i in range(self.vocab_size)]


def specials_of(folder: str, hf_config: dict) -> dict:
  """The checkpoint's special ids {'bos', 'eos', 'pad', 'unk'} (None where it has none):
  config.json's *_token_id first, then the tokens tokenizer_config.json names. An EOS list
  (chat models stop at several) keeps its first: our sampler stops at one EOS."""
  out = {}
  for role in ('bos', 'eos', 'pad'):
    value = hf_config.get(f'{role}_token_id')
    out[role] = value[0] if isinstance(value, list) and value else value
  names = {}
  for name in ('tokenizer_config.json', 'special_tokens_map.json'):
    path = os.path.join(folder, name)
    if os.path.isfile(path):
      with open(path) as f:
        found = json.load(f)
      for role in ('bos', 'eos', 'pad', 'unk'):
        token = found.get(f'{role}_token')
        token = token.get('content') if isinstance(token, dict) else token
        if token and role not in names:
          names[role] = token
  lookup = _token_lookup(folder)
  for role, token in names.items():
    if out.get(role) is None and lookup is not None:
      out[role] = lookup(token)
  return out


def _token_lookup(folder: str):
  path = os.path.join(folder, 'tokenizer.json')
  if os.path.isfile(path):
    import tokenizers
    return tokenizers.Tokenizer.from_file(path).token_to_id
  path = os.path.join(folder, 'tokenizer.model')
  if os.path.isfile(path):
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=path)
    return lambda token: (None if sp.piece_to_id(token) == sp.unk_id() and
                          token != sp.id_to_piece(sp.unk_id()) else sp.piece_to_id(token))
  return None


def has_tokenizer(folder: str) -> bool:
  return any(os.path.isfile(os.path.join(folder, f)) for f in FILES[:2])


def origin(workdir: str, *, depth: int = 32):
  """(run dir, its config dict) of the import run at the root of `workdir`'s init.run
  chain, or None when the chain starts elsewhere (the world, our own pretraining)."""
  for _ in range(depth):
    path = os.path.join(workdir, 'config.json')
    if not os.path.isfile(path):
      return None
    with open(path) as f:
      config = json.load(f)
    if config.get('stage') == 'import':
      return workdir, config
    workdir = (config.get('init') or {}).get('run')
    if not workdir:
      return None
  return None


def load_for_run(workdir: str):
  """The HFTokenizer of the checkpoint `workdir` descends from, or None."""
  found = origin(workdir)
  if found is None or not has_tokenizer(os.path.join(found[0], FOLDER)):
    return None
  run, config = found
  return HFTokenizer(os.path.join(run, FOLDER), vocab_size=config['model']['vocab_size'],
                     specials=config['hf']['specials'])
