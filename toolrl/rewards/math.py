"""The math answer reward: 1.0 when math-verify finds the final answer equal to the reference.

Both sides go through math-verify (`parse`, then `verify`), so "\\boxed{\\frac{1}{2}}",
"0.5" and "1/2" all match a reference of "1/2"; the model's answer is the boxed one when
there is one, else the last expression it wrote. math-verify times itself out with SIGALRM,
which works only in a process's main thread: run this reward in the reward pool (as
`toolrl.rewards.runner.RewardRunner` does), never in a thread.

    reward: {math: {_target_: toolrl.rewards.math.math_answer, answer_key: answer}}

    python -m pytest tests/unit/test_rewards.py -k math
"""

from __future__ import annotations

from math_verify import parse, verify

from toolrl.rewards.base import Scored


def math_answer(
    x: Scored, answer_key: str = "answer", parse_timeout_s: int = 3, verify_timeout_s: int = 3
) -> float:
    """1.0 when the final text's answer equals `x.row[answer_key]`, else 0.0 (also no answer).

    The timeouts are math-verify's own, per expression; keep their sum under the runner's
    `timeout_s`, so that a slow input scores 0 here rather than costing the worker."""
    if x.final_text is None:
        return 0.0
    if answer_key not in x.row:
        raise KeyError(f"row has no column {answer_key!r} (columns: {sorted(x.row)})")
    # `$...$` makes a bare reference such as "\\frac{1}{2}" read as LaTeX, not as text.
    gold = parse(f"${x.row[answer_key]}$", parsing_timeout=parse_timeout_s)
    if not gold:
        raise ValueError(f"math-verify cannot parse the reference answer {x.row[answer_key]!r}")
    pred = parse(x.final_text, parsing_timeout=parse_timeout_s)
    return 1.0 if verify(gold, pred, timeout_seconds=verify_timeout_s) else 0.0
