"""Question-answering rewards as Search-R1 scores them: exact match and token F1.

Both compare normalised text (lowercase; punctuation removed; the articles a, an, the
removed; whitespace collapsed) and take the best over the reference answers, which may be
one string or a list. The prediction is the text of the last `<answer>...</answer>` when
the final text has one, else the whole final text.

    reward: {em: {_target_: toolrl.rewards.qa.exact_match, answer_key: golden_answers}}

    python -m pytest tests/unit/test_rewards.py -k qa
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

from toolrl.rewards.base import Scored

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation, drop articles, collapse whitespace (in Search-R1's order)."""
    text = text.lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def extract_answer(final_text: str) -> str:
    """The text of the last <answer> block, or the whole text when there is none."""
    found = _ANSWER.findall(final_text)
    return found[-1] if found else final_text


def references(x: Scored, answer_key: str) -> list[str]:
    """The row's reference answers as a list of strings."""
    if answer_key not in x.row:
        raise KeyError(f"row has no column {answer_key!r} (columns: {sorted(x.row)})")
    refs = x.row[answer_key]
    if isinstance(refs, str):
        return [refs]
    if isinstance(refs, Sequence) and refs and all(isinstance(r, str) for r in refs):
        return list(refs)
    raise ValueError(f"column {answer_key!r} must be a string or a list of strings: {refs!r}")


def token_f1(prediction: str, reference: str) -> float:
    """F1 of the normalised token bags: 2PR / (P + R), 0.0 when nothing is shared."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def exact_match(x: Scored, answer_key: str = "answer") -> float:
    """1.0 when the normalised prediction equals a normalised reference, else 0.0."""
    if x.final_text is None:
        return 0.0
    pred = normalize_answer(extract_answer(x.final_text))
    return float(any(pred == normalize_answer(r) for r in references(x, answer_key)))


def f1(x: Scored, answer_key: str = "answer") -> float:
    """The best token F1 of the prediction against any reference."""
    if x.final_text is None:
        return 0.0
    pred = extract_answer(x.final_text)
    return max(token_f1(pred, r) for r in references(x, answer_key))
