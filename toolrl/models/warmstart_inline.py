"""Warm-start traces of the embedded model's inline variant (`model.embedded_tool=
calculator_inline`): plain text, no chat template, the calculator called with inline tags.

The rollout (`toolrl/rollout/protocols/inline.py` with `chat_template: false`) encodes the
prompt as a document, samples until `</calc>`, inserts `RESULT` with the calculator's answer
(mask 0) and lets the model continue in the same text up to the end-of-text id. The traces
are built from exactly those pieces, each encoded on its own as the rollout encodes it:

    What is 47 * 83?                       prompt            (mask 0)
    \\n<calc>47 * 83</calc>                  the model writes  (mask 1)
    \\n<result>3901</result>\\n               inserted RESULT   (mask 0)
    The answer is 3901.<|im_end|>          the model writes  (mask 1)

The mixture is the chat variant's (`toolrl.models.warmstart.make_trace`): a correct call,
a call with the wrong operator, or no call and a wrong guess, so RL has room to improve.
`conf/experiment/inline_calculator.yaml` inserts `RESULT` (a test checks that they agree).

    python -m toolrl.models.tiny --tool calculator_inline   # build the variant, print its path
    python -m toolrl.models.warmstart_inline                 # ... and print its behaviour mix
    python -m pytest tests/unit/test_tiny_model.py -k inline
"""

from __future__ import annotations

import asyncio
import random
import re
from typing import Any

import torch

OPEN, CLOSE = "<calc>", "</calc>"
RESULT = "\n<result>{result}</result>\n"  # what the protocol inserts after </calc>
CALL = "\n" + OPEN + "{expression}" + CLOSE  # what the model writes to call
ANSWER = "The answer is {}."  # the same final sentence as the chat variant's

# The warm-start of this variant (fields of WarmStartConfig that differ from its defaults).
WARMSTART: dict[str, Any] = {}


def make_segments(task: Any, cfg: Any, rng: random.Random) -> list[tuple[str, bool]]:
    """One trace as (text, written by the model) pieces, on a train or wide operand pair;
    the first piece is the prompt (the task's message text)."""
    from toolrl.models.warmstart import _wide_pair

    if rng.random() < cfg.p_wide:
        a, b = _wide_pair(task, rng)
    else:
        a, b = rng.choice(task.pairs("train"))
        a, b = (a, b) if rng.random() < 0.5 else (b, a)
    prompt = task.make_prompt(a, b, rng.randrange(len(task.cfg.phrasings)))
    segments = [(prompt_text(prompt.messages), False)]
    u = rng.random()
    if u < cfg.p_correct + cfg.p_wrong_op:
        op = "*" if u < cfg.p_correct else cfg.wrong_op
        result = {"*": a * b, "+": a + b, "-": a - b}[op]
        segments.append((CALL.format(expression=f"{a} {op} {b}"), True))
        segments.append((RESULT.format(result=result), False))
        segments.append((ANSWER.format(result), True))
    else:
        guess = a * b
        while guess == a * b:
            guess = rng.randint(100, 9999)
        segments.append(("\n" + ANSWER.format(guess), True))
    return segments


def prompt_text(messages: list[dict[str, Any]]) -> str:
    """The base-model prompt of the inline protocol (`chat_template: false`)."""
    return "\n\n".join(str(m["content"]) for m in messages)


def corpus_texts(cfg: Any, n: int) -> list[str]:
    """The pieces of `n` traces, each a text of its own (they are encoded apart): the corpus
    the tokenizer's text merges are learned on."""
    from toolrl.models.warmstart import _task

    task, rng = _task(cfg), random.Random(f"corpus:{cfg.seed}")
    return [text for _ in range(n) for text, _ in make_segments(task, cfg, rng)]


def encode_segments(
    tokenizer: Any, segments: list[tuple[str, bool]]
) -> tuple[list[int], list[int]]:
    """(ids, mask) of a trace as the rollout builds it: the prompt encoded as a document, every
    other piece as plain text, the end-of-text id after the last; mask 1 on model pieces."""
    from toolrl.rollout.text import PlainText

    plain = PlainText(tokenizer)
    ids, mask = [], []
    for i, (text, written) in enumerate(segments):
        piece = tokenizer.encode(text) if i == 0 else plain.encode(text)
        ids += piece
        mask += [int(written)] * len(piece)
    ids.append(tokenizer.eos_token_id)
    mask.append(1)
    return ids, mask


def trace(task: Any, cfg: Any, rng: random.Random, tokenizer: Any) -> tuple[list[int], list[int]]:
    """(ids, mask) of one new trace: what the warm-start trains on."""
    return encode_segments(tokenizer, make_segments(task, cfg, rng))


# ---------------------------------------------------------------------------- measurement

_EXPR = re.compile(r"^\s*(-?\d+)\s*([-+*/])\s*(-?\d+)\s*$")


def _classify(text: str, a: int, b: int) -> str:
    if CLOSE not in text:
        return "no_call"
    m = re.search(re.escape(OPEN) + r"(.*?)" + re.escape(CLOSE), text, re.S)
    e = _EXPR.match(m.group(1)) if m else None
    if e is None:
        return "malformed"
    if e.group(2) != "*":
        return "wrong_operator"
    return "correct_call" if (int(e.group(1)), int(e.group(3))) == (a, b) else "wrong_operands"


@torch.no_grad()
def _continue(model: Any, tokenizer: Any, ids: list[int], stop: str | None, n: int) -> list[int]:
    """Temperature-1 sample after `ids` up to the end-of-text id, `stop` or `n` new ids."""
    from toolrl.rollout.text import PlainText

    plain, out = PlainText(tokenizer), []
    for _ in range(n):
        logits = model(torch.tensor([ids + out])).logits[0, -1]
        out.append(int(torch.multinomial(torch.softmax(logits, -1), 1)))
        if out[-1] == tokenizer.eos_token_id or (stop and stop in plain.decode(out)):
            break
    return out


def measure_modes(
    model: Any, tokenizer: Any, task: Any = None, n: int = 100, seed: int = 0
) -> dict[str, float]:
    """Sample one episode per eval prompt as the inline rollout does (pause at `</calc>`, the
    calculator's answer inserted) and report the behaviour mix and the mean reward."""
    from toolrl.data.arithmetic import ArithmeticTask
    from toolrl.rollout.text import PlainText
    from toolrl.tools.calculator import Calculator

    task, calc, plain = task or ArithmeticTask(), Calculator(), PlainText(tokenizer)
    torch.manual_seed(seed)
    modes, rewards = [], []
    for p in task.prompts("eval")[:n]:
        a, b = (int(x) for x in re.findall(r"\d+", p.messages[0]["content"]))
        ids = tokenizer.encode(prompt_text(p.messages))
        new = _continue(model, tokenizer, ids, CLOSE, 24)
        text = plain.decode([i for i in new if i != tokenizer.eos_token_id])
        modes.append(_classify(text, a, b))
        if CLOSE in text and new[-1] != tokenizer.eos_token_id:
            expr = text[text.rfind(OPEN) + len(OPEN) : text.find(CLOSE)]
            result, _ = asyncio.run(calc.call("measure", {"expression": expr}))
            ins = plain.encode(RESULT.format(result=result))
            more = _continue(model, tokenizer, ids + new + ins, None, 16)
            text += plain.decode([i for i in more if i != tokenizer.eos_token_id])
        rewards.append(task.reward(text, p.answer))
    stats = {k: modes.count(k) / len(modes) for k in sorted(set(modes))}
    stats["mean_reward"] = sum(rewards) / len(rewards)
    return stats


if __name__ == "__main__":
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from toolrl.models.tiny import build_embedded_model, embedded_config

    path = build_embedded_model(embedded_config("calculator_inline"))
    print(path)
    tok, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path)
    print(measure_modes(model.eval(), tok))
