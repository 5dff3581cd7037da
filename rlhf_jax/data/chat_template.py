"""A Hugging Face checkpoint's chat template (the Jinja `chat_template` of its
tokenizer_config.json), rendered as transformers' apply_chat_template renders it, and a
conversation split into its prompt and its response pieces for the SFT loss mask.

Rendering: jinja2's ImmutableSandboxedEnvironment with trim_blocks and lstrip_blocks; the
variables `messages` (a list of {'role', 'content'}), `bos_token`, `eos_token` (the
tokenizer's special-token texts) and `add_generation_prompt`; the functions
`raise_exception(message)` and `strftime_now(format)`; a `tojson` filter as json.dumps with
ensure_ascii=False. A template that does not parse or raises while rendering is a
UserError of one line.

Split (`split`): for the i-th message, an assistant turn, its span in the full rendering
R = render(messages) is [len(render(messages[:i], add_generation_prompt=True)),
len(render(messages[:i + 1]))): the assistant's content and the template's end-of-turn
text that follows it (ChatML's `<|im_end|>\\n`, Llama 3's `<|eot_id|>`), which the model
must learn to emit to stop. Every such prefix rendering must be a prefix of R (templates
that render a turn differently once later turns follow are refused). The prompt is
R[:start of the first assistant span]: the conversation up to it and the generation prompt.
The response is the rest, as pieces (text, in the loss or not): a later user turn is
context, outside the loss.
"""
import dataclasses
import hashlib
import json

from rlhf_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Split:
  """prompt: text; pieces: ((text, in_loss), ...) of the response, in order."""
  prompt: str
  pieces: tuple


class Template:
  """A compiled chat template and the special-token texts it may print."""

  def __init__(self, source: str, *, bos_token: str = '', eos_token: str = ''):
    import jinja2
    from jinja2 import sandbox
    self.source, self.bos_token, self.eos_token = source, bos_token or '', eos_token or ''
    self.sha256 = hashlib.sha256(source.encode('utf-8')).hexdigest()

    def raise_exception(message):
      raise jinja2.exceptions.TemplateError(message)

    def strftime_now(fmt):
      import datetime
      return datetime.datetime.now().strftime(fmt)

    env = sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters['tojson'] = lambda x, ensure_ascii=False, indent=None, separators=None, \
        sort_keys=False: json.dumps(x, ensure_ascii=ensure_ascii, indent=indent,
                                    separators=separators, sort_keys=sort_keys)
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    try:
      self._compiled = env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
      raise UserError(f'the chat template does not parse: {e.message} (line {e.lineno})'
                      ) from None

  def render(self, messages, *, add_generation_prompt: bool = False) -> str:
    import jinja2
    try:
      return self._compiled.render(
          messages=[dict(role=m['role'], content=m['content']) for m in messages],
          bos_token=self.bos_token, eos_token=self.eos_token,
          add_generation_prompt=add_generation_prompt)
    except jinja2.exceptions.TemplateError as e:
      raise UserError(f'the chat template failed to render: {e}'.replace('\n', ' ')) from None

  def split(self, messages) -> Split:
    """The prompt and response pieces of a conversation (see the module docstring)."""
    full = self.render(messages)
    spans = []
    for i, m in enumerate(messages):
      if m['role'] != 'assistant':
        continue
      start = len(self._prefix(messages[:i], full, add_generation_prompt=True))
      end = len(self._prefix(messages[:i + 1], full, add_generation_prompt=False))
      if end <= start:
        raise UserError(f'the chat template renders assistant message {i + 1} as no text')
      spans.append((start, end))
    first = spans[0][0]
    pieces, at = [], first
    for start, end in spans:
      if start > at:
        pieces.append((full[at:start], False))
      pieces.append((full[start:end], True))
      at = end
    if at < len(full):
      pieces.append((full[at:], False))
    return Split(prompt=full[:first], pieces=tuple(pieces))

  def _prefix(self, messages, full: str, *, add_generation_prompt: bool) -> str:
    text = self.render(messages, add_generation_prompt=add_generation_prompt)
    if not full.startswith(text):
      raise UserError(f'the chat template renders the first {len(messages)} messages'
                      f'{" and the generation prompt" if add_generation_prompt else ""} as '
                      'text that is not the start of the whole conversation\'s: its '
                      'assistant turns cannot be located for the loss mask')
    return text


def of_tokenizer(tokenizer):
  """The Template of a tokenizer that has one (an HFTokenizer whose tokenizer_config.json
  holds a chat_template), else None."""
  source = getattr(tokenizer, 'chat_template', None)
  if not source:
    return None
  if isinstance(source, list):  # named templates: transformers' default is 'default'
    named = {t.get('name'): t.get('template') for t in source if isinstance(t, dict)}
    if 'default' not in named:
      raise UserError(f'the tokenizer has chat templates {sorted(named)} and none named '
                      "'default'")
    source = named['default']
  return Template(source, bos_token=getattr(tokenizer, 'bos_token', ''),
                  eos_token=getattr(tokenizer, 'eos_token', ''))
