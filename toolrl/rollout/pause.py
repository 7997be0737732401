"""Pauses that end a generation where its text completes a closing tag such as `</search>`.

Inline tool calls (Search-R1 style) are written inside the answer: `<search>query</search>`.
The engine runs token ids in and out, so there are no stop strings; instead
`VLLMEngine.generate(ids, sampling, pause)` streams the ids back and calls a `Pause` (see
`toolrl.rollout.sampler`) on all ids generated so far. The pauses made here cut the
generation at the FIRST token whose decoded text completes any of the given texts:

    n = min{ n : some text occurs in decode(ids[:n]) }

and keep exactly `ids[:n]`, the ids as sampled. The tag may be one token, split over many,
glued to the text before it (`x</search` + `>`) or to the text after it (`>\\n` is one
token in Qwen's vocabulary: the kept ids then end with `>\\n`, and the text runs one
character past the tag). With several texts, the one completed first in sampled order wins.
Only generated ids are seen, so a tag already in the prompt never matches.

Cost per call. Decoding all ids on every streamed chunk would cost O(length) each time, so
each call decodes only a window: the new ids plus enough earlier ids that their text holds
at least `max(len(text)) + 8` characters (the window's start is re-anchored every few
tokens, and widened when the earlier ids hold fewer characters than that: tokens that
decode to "" or to partial UTF-8). Why that is enough: a text completed by the new ids
starts at most `len(text) - 1` characters before them, so a window that starts after the
text's start holds fewer earlier characters than that, unless characters are inflated:
a window that starts inside a multi-byte character shows each stray byte as U+FFFD (up to
3 for one character), and the earlier text's last character may still be incomplete. The
8 spare characters cover both (tests/unit/test_pause.py fails with fewer than 2); for
ASCII texts none are needed. Windows stay a few times `max(len(text))` ids long, longer only over ids with no text.
When every text ends in a printable ASCII character, a chunk is decoded at all only if one
of its ids, decoded alone, contains such a last character (looked up once per id and cached
in the `StopAtTexts`): the id that completes a text holds its last byte, and an ASCII byte
decodes to itself on its own in byte-level BPE, Tekken and SentencePiece. Most calls thus
cost a few dict look-ups.

Assumptions: `decode(ids)` is a tokenizer's decode (lossy UTF-8, the same text for the
same ids) and its text only grows at the end as ids are appended (true of byte-level BPE,
Tekken and SentencePiece decoders; `clean_up_tokenization_spaces` and the like may break
it). Texts must not contain '\\ufffd'.

State: a pause remembers how far it has checked, so it must see ONE request's growing id
list. Make a fresh one per request: `StopAtTexts(decode, texts).pause()` (share the
`StopAtTexts`: it holds the per-id cache) or `stop_at_texts(decode, texts)`.

Run its tests: `.venv/bin/python -m pytest tests/unit/test_pause.py -q`
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

# Characters of text before the new ids that each window holds beyond max(len(text)).
_SLACK = 8


class StopAtTexts:
    """Makes per-request pauses that stop at the first completion of any of `texts`.

    One instance per (tokenizer, texts) can serve every request; `pause()` gives the
    per-request state.
    """

    def __init__(self, decode: Callable[[list[int]], str], texts: Sequence[str]) -> None:
        self.texts = tuple(texts)
        if not self.texts or not all(self.texts):
            raise ValueError(f"stop texts must be non-empty strings, got {self.texts!r}")
        if any("\ufffd" in t for t in self.texts):
            raise ValueError("stop texts must not contain '\\ufffd' (undecodable bytes)")
        self.decode = decode
        self.context_chars = max(map(len, self.texts)) + _SLACK
        last = {t[-1] for t in self.texts}
        # The per-id pre-check holds only for ASCII last characters (see module docstring);
        # " " decoded alone may vanish (SentencePiece drops a leading space), so not spaces.
        ascii_last = all(c.isascii() and c.isprintable() and not c.isspace() for c in last)
        self._last_chars = last if ascii_last else None
        self._may_end: dict[int, bool] = {}

    def pause(self) -> TextPause:
        """A fresh `Pause` for one request."""
        return TextPause(self)

    def may_end(self, token_id: int) -> bool:
        """False only if `token_id` certainly cannot complete any text."""
        if self._last_chars is None:
            return True
        hit = self._may_end.get(token_id)
        if hit is None:
            piece = self.decode([token_id])
            hit = self._may_end[token_id] = any(c in piece for c in self._last_chars)
        return hit

    def first_end(self, text: str) -> tuple[int, str] | None:
        """(end index, text) of the occurrence of any text that ends first in `text`."""
        best = None
        for t in self.texts:
            i = text.find(t)
            if i >= 0 and (best is None or i + len(t) < best[0]):
                best = (i + len(t), t)
        return best


class TextPause:
    """A `toolrl.rollout.sampler.Pause` for one request: how far the ids were checked, and
    (once it fired) where it cut and which text it found."""

    def __init__(self, stop: StopAtTexts) -> None:
        self._stop = stop
        self._checked = 0  # decode(ids[:checked]) holds none of the texts
        self._start = 0  # decode(ids[start:checked]) holds enough text (or start == 0)
        self._span = stop.context_chars  # ids of earlier text the window started with
        self.cut: int | None = None  # the n returned, once a text was completed
        self.matched: str | None = None  # which text

    def __call__(self, ids: list[int]) -> int | None:
        if self.cut is not None:
            return self.cut
        if len(ids) < self._checked:
            raise ValueError(
                f"pause saw {len(ids)} ids after {self._checked}: use a fresh pause per request"
            )
        stop, old = self._stop, self._checked
        if len(ids) == old:
            return None
        if not any(stop.may_end(t) for t in ids[old:]):
            self._advance(ids)
            return None
        found = stop.first_end(stop.decode(ids[self._start :]))
        if found is None:
            self._advance(ids)
            return None
        # One of ids[old:] completes a text: find the shortest prefix that holds one.
        lo, hi = old, len(ids)  # decode(ids[start:lo]) holds none, ids[start:hi] holds `found`
        while hi - lo > 1:
            mid = (lo + hi) // 2
            at_mid = stop.first_end(stop.decode(ids[self._start : mid]))
            if at_mid is None:
                lo = mid
            else:
                hi, found = mid, at_mid
        self.cut, self.matched = hi, found[1]
        return hi

    def _advance(self, ids: list[int]) -> None:
        """Mark `ids` checked; move the window start up when it lags far behind."""
        self._checked = len(ids)
        if self._checked - self._start <= 2 * self._span:
            return
        need = span = self._stop.context_chars
        while True:
            start = max(0, self._checked - span)
            if start == 0 or len(self._stop.decode(ids[start : self._checked])) >= need:
                self._start, self._span = start, span
                return
            span *= 2  # these ids hold less than one character each


def stop_at_texts(decode: Callable[[list[int]], str], texts: Sequence[str]) -> TextPause:
    """A fresh `Pause` ending at the first token that completes any of `texts` (one request)."""
    return StopAtTexts(decode, texts).pause()
