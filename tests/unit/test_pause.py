"""`toolrl.rollout.pause`: cutting a streamed generation right after a closing tag.

A hand-made byte vocabulary pins each case down (tag in one token, split, glued to the text
before or after it, several tags, tokens that decode to "" or to partial UTF-8, long
generations); the embedded tokenizer and the real Qwen2.5, Tekken and Mistral SentencePiece
vocabularies (tests/realtok.py; skipped without network unless TOOLRL_REQUIRE_REALTOK=1)
then run a fuzz: random texts with tags, tokenized canonically and at random split points,
with random ids mixed in, fed in chunks of random sizes. Every cut must be the shortest
prefix whose decoded text holds a tag, which is what decoding everything each time gives.

    .venv/bin/python -m pytest tests/unit/test_pause.py -q
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests import realtok
from toolrl.rollout.pause import StopAtTexts, stop_at_texts

TAG = "</search>"

# A byte vocabulary: id -> bytes; decoding joins the bytes and replaces bad UTF-8 with U+FFFD,
# as byte-level BPE decoders do.
BYTES: dict[int, bytes] = {
    0: b"",
    1: b"x</search",
    2: b">",
    3: b">\n",
    4: b"</search>",
    5: b"hello",
    6: b" ",
    7: b"</",
    8: b"search",
    9: b"<search>",
    10: b"</answer>",
    11: b"\xf0\x9f",  # the first half of U+1F642, then its second half
    12: b"\x99\x82",
    13: b"</search>.",
    14: b"\xe3\x80",  # U+3002 (ideographic full stop) split in two
    15: b"\x82",
    16: b"s",
    17: b"e",
}


def byte_decode(ids: list[int]) -> str:
    return b"".join(BYTES[i] for i in ids).decode("utf-8", errors="replace")


class Counting:
    """A decode that records the length of every id list it is given."""

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self.decode = decode
        self.sizes: list[int] = []

    def __call__(self, ids: list[int]) -> str:
        self.sizes.append(len(ids))
        return self.decode(ids)


def feed(pause, ids: list[int], sizes: Sequence[int] = (1,)) -> int | None:
    """Give `pause` growing prefixes of `ids`, chunk sizes cycling through `sizes`, the way
    the engine does; return its cut (checked to stay put once given) or None."""
    n, k = 0, 0
    while n < len(ids):
        n = min(len(ids), n + sizes[k % len(sizes)])
        k += 1
        cut = pause(ids[:n])
        if cut is not None:
            assert 1 <= cut <= n and pause(ids[:n]) == cut
            return cut
    return None


def reference_cut(decode, ids: list[int], texts: Sequence[str]) -> int | None:
    """The shortest prefix whose text holds a text, by decoding whole prefixes."""
    has = lambda n: any(t in decode(ids[:n]) for t in texts)  # noqa: E731
    if not has(len(ids)):
        return None
    lo, hi = 0, len(ids)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if has(mid) else (mid, hi)
    assert has(hi) and not has(hi - 1)
    return hi


@pytest.mark.parametrize(
    ("ids", "cut", "text"),
    [
        ([5, 4, 5], 2, "hello</search>"),  # one token
        ([5, 7, 8, 2, 5], 4, "hello</search>"),  # split over three
        ([5, 7, 16, 17, 0, 0], None, None),  # never completed
        ([5, 1, 2, 5], 3, "hellox</search>"),  # glued to the text before it
        ([5, 7, 8, 3, 5], 4, "hello</search>\n"),  # glued to the text after it
        ([13, 5], 1, "</search>."),
        ([7, 0, 0, 0, 8, 0, 2, 0], 7, "</search>"),  # ids that decode to nothing between
        ([11, 7, 12, 8, 2], None, None),  # a broken character inside is not the tag
        ([11, 12, 7, 8, 2], 5, "\U0001f642</search>"),
    ],
)
def test_cuts_right_after_the_tag(ids, cut, text) -> None:
    for sizes in [(1,), (3,), (len(ids),), (2, 1)]:
        pause = stop_at_texts(byte_decode, [TAG])
        assert feed(pause, ids, sizes) == cut == reference_cut(byte_decode, ids, [TAG])
        if cut is not None:
            assert byte_decode(ids[:cut]) == text and pause.matched == TAG


def test_earliest_of_several_tags_wins() -> None:
    texts = [TAG, "</answer>"]
    stop = StopAtTexts(byte_decode, texts)
    ids = [5, 10, 5, 4, 9, 4]
    for sizes in [(1,), (3,), (len(ids),)]:
        pause = stop.pause()
        assert feed(pause, ids, sizes) == 2 and pause.matched == "</answer>"
    # Two tags completed by the same token: the one whose text ends first.
    both = {**BYTES, 20: b"</answer></search>"}
    pause = stop_at_texts(lambda ids: b"".join(both[i] for i in ids).decode(), texts)
    assert pause([7, 8, 20]) == 3 and pause.matched == "</answer>"
    assert stop_at_texts(byte_decode, ["</answer>", TAG])([7, 8, 2, 10]) == 3


def test_a_pause_is_for_one_request() -> None:
    pause = stop_at_texts(byte_decode, [TAG])
    assert pause([5, 5, 7]) is None
    with pytest.raises(ValueError, match="fresh pause per request"):
        pause([5])
    with pytest.raises(ValueError, match="non-empty"):
        stop_at_texts(byte_decode, [])
    with pytest.raises(ValueError, match="non-empty"):
        stop_at_texts(byte_decode, [TAG, ""])


def test_non_ascii_text_split_over_partial_bytes() -> None:
    # "。" is completed by an id (b"\x82") that decodes to U+FFFD alone: no per-id pre-check.
    ids = [5, 14, 6, 5, 14, 15, 5]
    for sizes in [(1,), (3,), (len(ids),)]:
        assert feed(stop_at_texts(byte_decode, ["。"]), ids, sizes) == 6
    assert feed(stop_at_texts(byte_decode, ["o\u3002"]), ids, (1,)) == 6


def byte_per_id(ids: list[int]) -> str:
    return bytes(ids).decode("utf-8", errors="replace")


def test_non_ascii_texts_one_byte_per_id() -> None:
    # Every id one byte: windows start inside characters and non-ASCII tags span many ids
    # that decode to U+FFFD alone, so only a window with enough earlier text finds them.
    rng = random.Random(3)
    words = ["。", "日本", "é", " ", "x", "🙂", "\n", "→", "。。", "」"]
    texts = ["。。。", "→」", "🙂🙂"]
    for _ in range(200):
        text = "".join(rng.choice(words) for _ in range(rng.randint(0, 80)))
        if rng.random() < 0.8:
            at = rng.randint(0, len(text))
            text = text[:at] + rng.choice(texts) + text[at:]
        ids = list(text.encode())
        want = reference_cut(byte_per_id, ids, texts)
        for sizes in [(1,), (rng.randint(1, 9),)]:
            assert feed(stop_at_texts(byte_per_id, texts), ids, sizes) == want, (text, sizes)


def test_long_generations_decode_small_windows() -> None:
    # 3,000 ids with runs of ids that decode to "" and of half characters: the window
    # stretches over them, and each call still decodes a bounded number of ids.
    rng = random.Random(0)
    ids: list[int] = []
    while len(ids) < 3000:
        ids += rng.choice([[5], [6], [0] * rng.randint(1, 60), [11, 12], [14, 15], [7, 8], [16]])
    ids += [7] + [0] * 80 + [16, 17, 0] + [0] * 30 + [8, 2, 5]  # "</sesearch>": no tag
    ids += [7, 0, 0, 8] + [0] * 70 + [3, 5]  # "</search>\n" over 75 ids
    want = reference_cut(byte_decode, ids, [TAG])
    assert want == len(ids) - 1
    for sizes in [(1,), (7,), (1, 2, 50)]:
        counting = Counting(byte_decode)
        assert feed(stop_at_texts(counting, [TAG]), ids, sizes) == want
        window = [s for s in counting.sizes if s > 1]
        # Ids decoded alone (the per-id pre-check) are few; windows stay short.
        assert sum(s == 1 for s in counting.sizes) <= len(BYTES) + 2
        assert max(window) < 400 and sum(window) < 10 * len(ids)


# --- real vocabularies --------------------------------------------------------------------

FILLER = [
    "the", " answer", " is", " 42", ".", "\n", "\n\n", " search", "<", ">", "</", "/search",
    " é", "北京", " 🙂", "日本語", " naïve", "  ", "\t", "search>", "<search", "</searc", "h>",
]  # fmt: skip
TAGS = ["</search>", "</answer>", "</tool_call>"]
AFTER = ["", "\n", "\n\n", ".", " ", ">", "\n<", "🙂", "x", "</search>"]


def random_text(rng: random.Random) -> str:
    parts = [rng.choice(FILLER) for _ in range(rng.randint(0, 120))]
    if rng.random() < 0.85:
        parts.insert(rng.randint(0, len(parts)), rng.choice(TAGS) + rng.choice(AFTER))
    return "".join(parts)


def random_ids(rng: random.Random, tok: Any, text: str) -> list[int]:
    """`text` encoded whole, or in pieces cut at random characters, with random ids added."""
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    if rng.random() < 0.4:
        return enc(text)
    ids: list[int] = []
    i = 0
    while i < len(text):
        j = min(len(text), i + rng.randint(1, 12))
        ids += enc(text[i:j])
        if rng.random() < 0.1:  # anything the model might sample, partial bytes included
            ids += [rng.randrange(len(tok)) for _ in range(rng.randint(1, 4))]
        i = j
    return ids


def check_fuzz(tok: Any, n_cases: int, seed: int) -> None:
    rng = random.Random(seed)
    decoders = {
        "plain": lambda ids: tok.decode(ids),
        "skip_special": lambda ids: tok.decode(ids, skip_special_tokens=True),
    }
    stops = {name: StopAtTexts(d, TAGS) for name, d in decoders.items()}
    special = list(tok.all_special_ids)
    for case in range(n_cases):
        name = "skip_special" if case % 4 == 3 else "plain"
        decode = decoders[name]
        ids = random_ids(rng, tok, random_text(rng))
        if name == "skip_special" and ids:  # runs of ids that decode to ""
            at = rng.randrange(len(ids))
            ids[at:at] = [rng.choice(special)] * rng.randint(1, 40)
        want = reference_cut(decode, ids, TAGS)
        sizes = [rng.choice([1, 1, 2, 3, 16]) for _ in range(5)]
        pause = stops[name].pause()
        got = feed(pause, ids, sizes)
        assert got == want, (case, name, ids, sizes)
        if want is None:
            continue
        full, cut_text = decode(ids), decode(ids[:want])
        end = stops[name].first_end(full)
        assert end == stops[name].first_end(cut_text) and end[1] == pause.matched
        assert len(decode(ids[: want - 1])) < end[0] <= len(cut_text)  # the last id completes it


class RawTokenizer:
    """The `tokenizers` pipeline of a tokenizer folder with the few HF methods used here:
    the same encode and decode as `AutoTokenizer` (these folders do no space clean-up),
    loaded in a fraction of the time."""

    def __init__(self, folder: Path) -> None:
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        decoder = self.tok.get_added_tokens_decoder()
        self.all_special_ids = sorted(i for i, t in decoder.items() if t.special)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def __len__(self) -> int:
        return self.tok.get_vocab_size()


def test_embedded_tokenizer(embedded_base: str) -> None:
    tok = RawTokenizer(Path(embedded_base))
    (close,) = tok.encode("</tool_call>", add_special_tokens=False)  # one added token
    ids = tok.encode("ok <tool_call>{}</tool_call>\nthen", add_special_tokens=False)
    cut = feed(stop_at_texts(tok.decode, ["</tool_call>"]), ids)
    assert cut == ids.index(close) + 1
    ids = tok.encode("a <search>2 + 2</search>\nb</search>", add_special_tokens=False)
    assert len(tok.encode(TAG, add_special_tokens=False)) > 1  # split over several ids here
    cut = feed(stop_at_texts(tok.decode, [TAG]), ids, (3,))
    assert tok.decode(ids[:cut]).startswith("a <search>2 + 2</search>")
    assert cut == reference_cut(tok.decode, ids, [TAG])
    check_fuzz(tok, 150, seed=1)


REAL = ["qwen2_5", "tekken", "mistral_spm"]  # byte-level BPE, Tekken, SentencePiece


@pytest.mark.parametrize("name", REAL)
def test_real_vocabulary(name: str) -> None:
    tok = RawTokenizer(realtok.folder_or_skip(name))
    text = "Let me look. <search>capital of 北京 🙂</search>\nThe answer</search>"
    ids = tok.encode(text, add_special_tokens=False)
    for sizes in [(1,), (3,), (len(ids),)]:
        cut = feed(stop_at_texts(tok.decode, [TAG]), ids, sizes)
        assert cut == reference_cut(tok.decode, ids, [TAG])
        kept = tok.decode(ids[:cut])
        assert kept.endswith(TAG) or kept.endswith(TAG + "\n")
    if name == "qwen2_5":  # ">\n" is one token: the kept ids end with it, as sampled
        assert tok.decode(ids[cut - 1 : cut]) == ">\n" and kept.endswith(TAG + "\n")
    check_fuzz(tok, 150, seed=REAL.index(name))
