"""P5-style sequential prompts for the cloud LLM, and the tokenizer.

LSC4Rec (Lv et al., KDD 2025) trains its LLM on P5's "sequential" prompt
family and generates candidates with P5's held-out template 2-13:

  According to the purchase history of user_{user} : {history} Can you
  recommend the next possible item to the user ?

The training templates here are direct next-item prompts in the spirit of
P5's 2-1..2-6 (our own wording); the target is the next item's identifier.
The history is joined with ' , ' or ' -> ' (each with probability 1/2 in
training, as in the paper's code).

Prompts are assembled from token pieces: the template text around the
history, the user field, and each item's identifier tokens
(`lsc_jax.models.item_ids`). For a tokenizer that splits on whitespace first
(SentencePiece's Metaspace, as T5's tokenizer and the one trained here do),
this equals tokenizing the rendered text; `render_text` gives that text. For
atomic ids an item is one appended token, written `<item_{i}>` in the text.

Tokenizer: a pretrained T5 tokenizer from a local directory, or else a small
BPE tokenizer with SentencePiece-style pre-tokenization, trained on the spot
on the template words, the user fields and the decimal item ids (no
interactions), saved in the workdir so a rerun loads the same one.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence

import numpy as np
import transformers

from lsc_jax.models.item_ids import ItemIds

log = logging.getLogger(__name__)

# Direct next-item templates; `train` ones are sampled uniformly in
# training, `test` is the held-out inference template.
TEMPLATES: dict[str, str] = {
  '2-1': (
    'Given the purchase history of user_{user} : {history} what will the '
    'user buy next ?'
  ),
  '2-2': (
    'User_{user} bought these items in order : {history} Which item should '
    'we suggest to this user next ?'
  ),
  '2-3': (
    'Here are the items user_{user} purchased : {history} recommend the '
    'next item for this user'
  ),
  '2-4': (
    'Purchase sequence of user_{user} : {history} predict the item the user '
    'is most likely to buy next'
  ),
  '2-5': (
    'Considering what user_{user} has purchased : {history} which item comes '
    'next for the user ?'
  ),
  '2-6': (
    'History of user_{user} : {history} What is the next item to recommend '
    'to the user ?'
  ),
  '2-13': (
    'According to the purchase history of user_{user} : {history} Can you '
    'recommend the next possible item to the user ?'
  ),
}
TRAIN_TEMPLATES = ('2-1', '2-2', '2-3', '2-4', '2-5', '2-6')
TEST_TEMPLATE = '2-13'
SEPARATORS = (' , ', ' -> ')
SPECIAL_TOKENS = ('<pad>', '</s>', '<unk>')


def render_text(
  template: str,
  user: int,
  history: Sequence[int],
  separator: str = ' , ',
  scheme: str = 'text',
) -> str:
  """The prompt as text (what the token assembly equals).

  Items are written as decimal ids (`text`) or `<item_{i}>` (`atomic`).
  """
  if scheme == 'atomic':
    items = [f'<item_{int(i)}>' for i in history]
  else:
    items = [str(int(i)) for i in history]
  text = TEMPLATES[template].format(
    user=int(user), history=separator.join(items)
  )
  return ' '.join(text.split())


def tokenizer_corpus(num_users: int, num_items: int) -> list[str]:
  """Texts to train the prompt tokenizer on: template words, user fields,
  separators and the decimal item ids (no interaction data)."""
  words = []
  for template in TEMPLATES.values():
    # Repeated so that template words outweigh the ids and stay whole.
    text = template.replace('{user}', '0').replace('{history}', '1 , 2 -> 3')
    words.extend([text] * 200)
  words.extend(f'user_{u}' for u in range(num_users))
  words.extend(str(i) for i in range(1, num_items + 1))
  words.extend(s.strip() for s in SEPARATORS)
  return words


def train_tokenizer(
  num_users: int, num_items: int, vocab_size: int = 1000
) -> transformers.PreTrainedTokenizerFast:
  """A small BPE tokenizer (pad 0, EOS 1, unk 2) with SentencePiece-style
  Metaspace pre-tokenization, trained on `tokenizer_corpus`.

  With the default 1000 tokens, template words are whole tokens and item
  ids split into a few digit pieces ('12101' -> '▁1', '21', '01'), like
  T5's SentencePiece does.
  """
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  tokenizer = Tokenizer(models.BPE(unk_token='<unk>'))
  tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
  tokenizer.decoder = decoders.Metaspace()
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size,
    special_tokens=list(SPECIAL_TOKENS),
    show_progress=False,
  )
  tokenizer.train_from_iterator(
    tokenizer_corpus(num_users, num_items), trainer=trainer
  )
  wrapped = transformers.PreTrainedTokenizerFast(
    tokenizer_object=tokenizer,
    pad_token='<pad>',
    eos_token='</s>',
    unk_token='<unk>',
  )
  ids = [wrapped.pad_token_id, wrapped.eos_token_id, wrapped.unk_token_id]
  if ids != [0, 1, 2]:
    raise RuntimeError(f'special token ids are {ids}, expected [0, 1, 2].')
  return wrapped


def load_or_train_tokenizer(
  *,
  num_users: int,
  num_items: int,
  workdir: str | None = None,
  pretrained: str | None = None,
  vocab_size: int = 1000,
):
  """The prompt tokenizer.

  Args:
    num_users, num_items: sizes of the dataset (for a trained tokenizer).
    workdir: where a trained tokenizer is saved (`<workdir>/tokenizer`) and
      loaded from on a rerun; None trains one in memory.
    pretrained: a local directory with a T5 tokenizer (e.g. t5-small's);
      takes precedence.
    vocab_size: size of a trained tokenizer.
  """
  if pretrained:
    tokenizer = transformers.AutoTokenizer.from_pretrained(pretrained)
    if not tokenizer.is_fast:
      raise ValueError(f'{pretrained}: a fast tokenizer is needed.')
  else:
    path = os.path.join(workdir, 'tokenizer') if workdir else None
    if path and os.path.exists(os.path.join(path, 'tokenizer.json')):
      tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(path)
      log.info('loaded the prompt tokenizer from %s', path)
    else:
      tokenizer = train_tokenizer(num_users, num_items, vocab_size)
      if path:
        tokenizer.save_pretrained(path)
        log.info('trained the prompt tokenizer, saved to %s', path)
  for name in ('pad_token_id', 'eos_token_id'):
    if getattr(tokenizer, name) is None:
      raise ValueError(f'the prompt tokenizer has no {name}.')
  return tokenizer


@dataclasses.dataclass
class PromptBuilder:
  """Assembles prompt token ids from users and histories.

  Attributes:
    tokenizer: the prompt tokenizer.
    item_ids: identifiers (`prompt_tokens` writes an item in a prompt).
    max_history: keep only the newest this many history items (None: all).
    max_prompt_tokens: a prompt longer than this (EOS included) drops its
      oldest items until it fits; `truncated` counts such prompts.
  """

  tokenizer: object
  item_ids: ItemIds
  max_history: int | None = 20
  max_prompt_tokens: int = 512

  def __post_init__(self):
    self._pieces: dict[str, list[int]] = {}
    self._users: dict[int, list[int]] = {}
    self.truncated = 0

  def _encode(self, text: str) -> list[int]:
    # Pieces are whole words, so the spaces around them carry no tokens.
    text = text.strip()
    if text not in self._pieces:
      ids = self.tokenizer(text, add_special_tokens=False)['input_ids']
      self._pieces[text] = list(ids) if text else []
    return self._pieces[text]

  def _template_pieces(self, template: str):
    before_user, rest = TEMPLATES[template].split('{user}')
    between, after = rest.split('{history}')
    return before_user, between, after

  def _user_tokens(self, template: str, user: int) -> list[int]:
    # The user field is glued to the word before it ('user_{user}'), so the
    # word around it is tokenized together.
    before_user, between, _ = self._template_pieces(template)
    head, _, word = before_user.rpartition(' ')
    tail, _, rest = between.partition(' ')
    key = (template, int(user))
    if key not in self._users:
      self._users[key] = self._encode(head) + self._encode(
        f'{word}{int(user)}{tail}'
      )
    return self._users[key]

  def build(
    self,
    user: int,
    history: Sequence[int] | np.ndarray,
    *,
    template: str = TEST_TEMPLATE,
    separator: str = SEPARATORS[0],
  ) -> np.ndarray:
    """int32 `[prompt_len]` token ids of one prompt, EOS last."""
    if template not in TEMPLATES:
      raise ValueError(
        f'Unknown template {template!r}; expected one of {sorted(TEMPLATES)}.'
      )
    history = np.asarray(history)
    if len(history):
      self.item_ids.check_items(history, f'prompt history of user {user}')
    if self.max_history is not None:
      history = history[len(history) - min(len(history), self.max_history) :]
    _, between, after = self._template_pieces(template)
    rest = between.partition(' ')[2]
    head = self._user_tokens(template, user) + self._encode(rest)
    tail = self._encode(after) + [self.item_ids.eos_id]
    sep = self._encode(separator)
    items = [self.item_ids.prompt_tokens(int(i)).tolist() for i in history]

    budget = self.max_prompt_tokens - len(head) - len(tail)
    used = sum(len(x) for x in items) + len(sep) * max(len(items) - 1, 0)
    if used > budget:
      self.truncated += 1
      while items and used > budget:
        used -= len(items[0]) + (len(sep) if len(items) > 1 else 0)
        items = items[1:]
    body: list[int] = []
    for i, tokens in enumerate(items):
      if i:
        body.extend(sep)
      body.extend(tokens)
    return np.asarray(head + body + tail, np.int32)

  def build_many(
    self,
    users: np.ndarray,
    ends: np.ndarray,
    sequences: Sequence[np.ndarray],
    *,
    templates: Sequence[str] | str = TEST_TEMPLATE,
    separators: Sequence[str] | str = SEPARATORS[0],
  ) -> list[np.ndarray]:
    """Prompts for users with histories `sequences[user][:end]`."""
    count = len(users)
    if isinstance(templates, str):
      templates = [templates] * count
    if isinstance(separators, str):
      separators = [separators] * count
    out = []
    for user, end, template, separator in zip(
      np.asarray(users).tolist(),
      np.asarray(ends).tolist(),
      templates,
      separators,
      strict=True,
    ):
      if end < 0 or end > len(sequences[user]):
        raise ValueError(
          f'history end {end} of user {user} is outside 0..'
          f'{len(sequences[user])}.'
        )
      out.append(
        self.build(
          user,
          sequences[user][:end],
          template=template,
          separator=separator,
        )
      )
    return out


def bucket_length(length: int, multiple: int = 16) -> int:
  """`length` rounded up to a multiple (bounds the compiled shapes)."""
  return max(multiple, -(-length // multiple) * multiple)


def pad_prompts(
  prompts: Sequence[np.ndarray], length: int, rows: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
  """Right-pads prompts to `[rows, length]` ids and a bool mask.

  Rows past `len(prompts)` are all padding (mask False).
  """
  rows = len(prompts) if rows is None else rows
  ids = np.zeros((rows, length), np.int32)
  mask = np.zeros((rows, length), bool)
  for r, prompt in enumerate(prompts):
    if len(prompt) > length:
      raise ValueError(f'prompt {r} has {len(prompt)} tokens > {length}.')
    ids[r, : len(prompt)] = prompt
    mask[r, : len(prompt)] = True
  return ids, mask
