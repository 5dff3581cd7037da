"""A Hugging Face tokenizer's chat template applied to `messages` SFT rows
(data/chat_template.py through data/jsonl.py): a ChatML template (as Qwen2's) and a
Llama 3 template, written here, on a tiny word-level tokenizer built with `tokenizers`.
The expected renderings are spelled out by hand, and the expected ids and loss mask are
the hand-listed tokens looked up in the tokenizer's vocabulary."""
import json

import numpy as np
import pytest

from rlhf_jax.data import chat_template, hf_tokenizer, jsonl
from rlhf_jax.errors import UserError

VOCAB = ['[UNK]', 'user', 'assistant', 'system', 'hi', 'yo', 'why', 'so', 'fine', 'be', 'ok',
         '<|im_start|>', '<|im_end|>', '<s>', '<pad>', '<|begin_of_text|>',
         '<|start_header_id|>', '<|end_header_id|>', '<|eot_id|>']
SPECIAL = [t for t in VOCAB if t.startswith('<')]

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
          "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
# Llama 3's shape: BOS printed by the template itself, contents trimmed, no newline after
# <|eot_id|>.
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}"
          "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
          " + message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
          "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
          "{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")

MESSAGES = [{'role': 'system', 'content': 'be ok'}, {'role': 'user', 'content': 'hi'},
            {'role': 'assistant', 'content': 'yo'}, {'role': 'user', 'content': 'why'},
            {'role': 'assistant', 'content': ' so fine '}]


def make_tokenizer(folder, template, *, bos: str, eos: str):
  import tokenizers
  folder.mkdir()
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(
      {w: i for i, w in enumerate(VOCAB)}, unk_token='[UNK]'))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  tok.add_special_tokens(SPECIAL)
  tok.save(str(folder / 'tokenizer.json'))
  (folder / 'tokenizer_config.json').write_text(json.dumps(
      {'chat_template': template, 'bos_token': bos, 'eos_token': eos}))
  specials = {'bos': VOCAB.index(bos), 'eos': VOCAB.index(eos), 'pad': VOCAB.index('<pad>')}
  return hf_tokenizer.HFTokenizer(str(folder), vocab_size=len(VOCAB), specials=specials)


def ours(tok, words) -> list[int]:
  """Our ids of the hand-listed checkpoint tokens (the import's permutation, inverted)."""
  inverse = np.argsort(hf_tokenizer.permutation(len(VOCAB), {
      'bos': VOCAB.index(tok.bos_token), 'eos': VOCAB.index(tok.eos_token),
      'pad': VOCAB.index('<pad>')}))
  return [int(inverse[VOCAB.index(w)]) for w in words]


def tokenize_one(tok, tmp_path, messages=MESSAGES):
  path = tmp_path / 'd.jsonl'
  path.write_text(json.dumps({'messages': messages}) + '\n')
  return jsonl.tokenize(str(path), kind='sft', tokenizer=tok, prompt_len=64, response_len=64)


def check(arrays, tok, prompt_words, response):
  prompt = [tok.bos_id] + ours(tok, prompt_words)
  ids = ours(tok, [w for w, _ in response])
  mask = [float(m) for _, m in response]
  p, r = arrays['prompts'].shape[1], arrays['response'].shape[1]
  assert arrays['prompts'][0].tolist() == [0] * (p - len(prompt)) + prompt
  assert arrays['response'][0].tolist() == ids + [0] * (r - len(ids))
  assert arrays['mask'][0].tolist() == mask + [0.0] * (r - len(mask))


def test_chatml_rendering_ids_and_mask(tmp_path):
  tok = make_tokenizer(tmp_path / 'qwen', CHATML, bos='<s>', eos='<|im_end|>')
  template = chat_template.of_tokenizer(tok)
  assert template.render(MESSAGES) == (
      '<|im_start|>system\nbe ok<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n'
      '<|im_start|>assistant\nyo<|im_end|>\n<|im_start|>user\nwhy<|im_end|>\n'
      '<|im_start|>assistant\n so fine <|im_end|>\n')
  split = template.split(MESSAGES)
  assert split.prompt == ('<|im_start|>system\nbe ok<|im_end|>\n<|im_start|>user\nhi'
                          '<|im_end|>\n<|im_start|>assistant\n')
  assert split.pieces == (('yo<|im_end|>\n', True),
                          ('<|im_start|>user\nwhy<|im_end|>\n<|im_start|>assistant\n', False),
                          (' so fine <|im_end|>\n', True))
  arrays, report = tokenize_one(tok, tmp_path)
  # The template prints no BOS: ours is put first. <|im_end|> is the EOS (our id 2).
  check(arrays, tok,
        ['<|im_start|>', 'system', 'be', 'ok', '<|im_end|>', '<|im_start|>', 'user', 'hi',
         '<|im_end|>', '<|im_start|>', 'assistant'],
        [('yo', 1), ('<|im_end|>', 1), ('<|im_start|>', 0), ('user', 0), ('why', 0),
         ('<|im_end|>', 0), ('<|im_start|>', 0), ('assistant', 0), ('so', 1), ('fine', 1),
         ('<|im_end|>', 1)])
  assert arrays['response'][0][1] == tok.eos_id == 2
  assert report['template_sha256'] == chat_template.Template(CHATML).sha256
  assert 'chat_template' in report['template']


def test_llama3_template_prints_bos_once(tmp_path):
  tok = make_tokenizer(tmp_path / 'llama', LLAMA3, bos='<|begin_of_text|>', eos='<|eot_id|>')
  template = chat_template.of_tokenizer(tok)
  h = lambda role: f'<|start_header_id|>{role}<|end_header_id|>\n\n'
  assert template.render(MESSAGES) == (
      '<|begin_of_text|>' + h('system') + 'be ok<|eot_id|>' + h('user') + 'hi<|eot_id|>' +
      h('assistant') + 'yo<|eot_id|>' + h('user') + 'why<|eot_id|>' + h('assistant') +
      'so fine<|eot_id|>')
  arrays, _ = tokenize_one(tok, tmp_path)
  header = lambda role: ['<|start_header_id|>', role, '<|end_header_id|>']
  # check() puts our BOS first: the template's own <|begin_of_text|> is that BOS, once.
  check(arrays, tok,
        header('system') + ['be', 'ok', '<|eot_id|>'] + header('user') + ['hi', '<|eot_id|>']
        + header('assistant'),
        [('yo', 1), ('<|eot_id|>', 1)] + [(w, 0) for w in header('user') + ['why', '<|eot_id|>']
                                          + header('assistant')]
        + [('so', 1), ('fine', 1), ('<|eot_id|>', 1)])
  assert (arrays['prompts'][0] == tok.bos_id).sum() == 1


def test_template_errors_are_one_line(tmp_path):
  strict = ("{% if messages[0]['role'] != 'user' %}"
            "{{ raise_exception('Conversations must start with the user') }}{% endif %}" + CHATML)
  tok = make_tokenizer(tmp_path / 'strict', strict, bos='<s>', eos='<|im_end|>')
  with pytest.raises(UserError) as e:
    tokenize_one(tok, tmp_path)
  message = str(e.value)
  assert 'line 1: the chat template failed to render: Conversations must start with the user' \
      in message and '\n' not in message
  tok = make_tokenizer(tmp_path / 'broken', '{% for m in messages %}{{ m }', bos='<s>',
                       eos='<|im_end|>')
  with pytest.raises(UserError, match='the chat template does not parse'):
    tokenize_one(tok, tmp_path)


def test_sandboxed(tmp_path):
  template = chat_template.Template("{{ messages.__class__.__mro__ }}")
  with pytest.raises(UserError, match='failed to render'):
    template.render(MESSAGES)
