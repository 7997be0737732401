"""Plain text to ids and back, for what the rollout inserts: no control token forms in it.

Tool answers and environment observations are text the model reads; a tool that prints
`<|im_end|>` must get the ids of those characters, not the control token. `PlainText`
encodes as the tokenizer encodes the text between two added tokens of a longer text (see
toolrl/rollout/chat.py), decodes sampled ids for parsers (never to be encoded back), and
cuts a long answer with a marker the model reads.

    python -m pytest tests/unit/test_chat.py
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any


def _plain_encoder(tok: Any) -> Callable[[str], list[int]] | None:
    """Encode text as a fast tokenizer encodes the text between two added tokens of a longer
    text: its normalizer, pre-tokenizer and model, without matching any added token. None for
    a tokenizer without a `tokenizers` backend.

    A Metaspace pre-tokenizer that puts "▁" before the start of the text only (`first`, as in
    Llama 2-style SentencePiece conversions) is used with `never`: the text encoded here never
    starts a render, and its first word must not get a "▁" that the render does not have."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        return None
    from tokenizers import pre_tokenizers

    def no_first(pre: Any) -> Any:
        if isinstance(pre, pre_tokenizers.Metaspace) and str(pre.prepend_scheme) == "first":
            return pre_tokenizers.Metaspace(
                replacement=pre.replacement, prepend_scheme="never", split=pre.split
            )
        if isinstance(pre, pre_tokenizers.Sequence):
            return pre_tokenizers.Sequence([no_first(p) for p in _children(pre)])
        return pre

    norm, pre, model = backend.normalizer, no_first(backend.pre_tokenizer), backend.model

    def encode(text: str) -> list[int]:
        text = norm.normalize_str(text) if norm is not None else text
        words = pre.pre_tokenize_str(text) if pre is not None else [(text, None)]
        return [t.id for w, _ in words if w for t in model.tokenize(w)]

    return encode


def _children(seq: Any) -> list[Any]:
    """The pre-tokenizers of a `tokenizers` Sequence (it indexes but has no len)."""
    out = []
    while True:
        try:
            out.append(seq[len(out)])
        except IndexError:
            return out


# Tool text longer than this many characters per kept token is cut by characters first;
# no real vocabulary has tokens this long.
MAX_CHARS_PER_TOKEN = 64


class PlainText:
    def __init__(self, tokenizer: Any) -> None:
        self.tok = tokenizer
        added = sorted(getattr(tokenizer, "get_added_vocab", dict)(), key=len, reverse=True)
        self._added = re.compile("|".join(map(re.escape, added))) if added else None
        self._plain = _plain_encoder(tokenizer)

    def _encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def encode(self, text: str) -> list[int]:
        """Encode text as one run in which no added or special token (`<|im_end|>`,
        `<tool_call>`) can form. Without a `tokenizers` backend (a slow tokenizer), each
        occurrence of one is cut after its first character and the pieces encoded apart,
        which can differ from a render where the vocabulary merges across the cuts."""
        if self._plain is not None:
            return self._plain(text)
        ids, pos = [], 0
        for m in self._added.finditer(text) if self._added else ():
            ids += self._encode(text[pos : m.start()]) + self._encode(m.group()[0])
            ids += self.encode(m.group()[1:])
            pos = m.end()
        return ids + self._encode(text[pos:])

    def decode(self, ids: list[int]) -> str:
        """Text of sampled ids, for parsers only: it is never encoded back."""
        return self.tok.decode(ids, skip_special_tokens=False)

    def truncate(self, text: str, max_tokens: int) -> str:
        """`text` cut to its first `max_tokens` tokens (as plain text), with a marker saying how
        many were cut, so a tool's flood costs a bounded share of the context. A flood of
        more than MAX_CHARS_PER_TOKEN characters per kept token is cut to that many characters
        first and counted in characters: tokenizing 10 MB would stall the rollout worker."""
        cap = max_tokens * MAX_CHARS_PER_TOKEN
        if len(text) > cap:
            kept, _ = self._first_tokens(text[:cap], max_tokens)
            return kept + f"\n[output truncated: {len(text) - len(kept)} more characters]"
        kept, cut = self._first_tokens(text, max_tokens)
        return text if not cut else kept + f"\n[output truncated: {cut} more tokens]"

    def _first_tokens(self, text: str, n: int) -> tuple[str, int]:
        """(`text` cut to its first `n` tokens, how many tokens were cut); uncut: (text, 0)."""
        ids = self.encode(text)
        if len(ids) <= n:
            return text, 0
        return self.tok.decode(ids[:n], skip_special_tokens=False), len(ids) - n
