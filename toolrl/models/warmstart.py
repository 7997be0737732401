"""Supervised warm-start of the embedded model on synthetic arithmetic traces.

A short next-token pass (loss on assistant tokens only) teaches the tiny model the tool-call
format and, above all, copying: the operands from the prompt into the call and the tool's
result into the answer. The traces deliberately mix good and bad *decisions* so that RL has
an easy way up, while every trace copies exactly:

    correct   (p_correct)   <tool_call> 47 * 83 </tool_call> -> 3901 -> "The answer is 3901."
    wrong op  (p_wrong_op)  <tool_call> 47 + 83 </tool_call> -> 130  -> "The answer is 130."
    no call   (the rest)    "The answer is 5712."  (a random wrong guess)

`WarmStartConfig.tool` picks the tool the traces call (`ToolStyle`): "calculator" with
{"expression": "47 * 83"}, or "python" with {"code": "print(47 * 83)"}, whose answer is what
the program prints. The prompt renders that tool's schema, which must be exactly the schema
the RL run's tool returns (`PYTHON_SCHEMA` for the python sandbox tool).

The decision (call or not, which operator) is one or two tokens, which RL moves quickly.
Traces use train operand pairs of `toolrl.data.arithmetic` and "wide" pairs outside the
task's range; eval pairs never appear.

Two things make copying learnable in tens of small steps (measured: with the default
Hugging Face init, a similar 2-layer model had not started copying after 1,000 steps of 8
traces; with both, operands and results were copied by step 50-100):
- `init_copy_heads`: each attention head starts as a copier (W_O W_V a projection), so
  training only has to learn where to look;
- `DigitEmbedding`: during the warm-start a number token's embedding is the sum of
  per-(place, digit) vectors, so a copy learned on frequent numbers works for the rare
  ones (most products appear once or never); the sums are then written into the plain
  embedding matrix.

`measure_modes` samples a model at temperature 1 on eval prompts with a minimal loop (plain
transformers, no vLLM) and reports the behaviour mix; `bench/warmstart_modes.py` prints it.

    python -m toolrl.models.tiny                  # builds and warm-starts the default model
    python -m toolrl.models.tiny --tool python    # ... the variant that calls `python`
    python bench/warmstart_modes.py [--tool python]   # behaviour mix of the built model
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import re
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from toolrl.data.arithmetic import ArithmeticConfig, ArithmeticTask, last_integer
from toolrl.tools.calculator import CALCULATOR_SCHEMA
from toolrl.tools.python_exec import SCHEMA as PYTHON_SCHEMA

log = logging.getLogger(__name__)

ANSWER = "The answer is {}."


@dataclass(frozen=True)
class ToolStyle:
    """How traces call the arithmetic tool: its name, schema and the one argument's shape.

    `wrap` turns an expression into the argument ("{}" or "print({})"); `expression` undoes
    it on a sampled call (by regex only: model text is never executed).
    """

    name: str
    schema: dict[str, Any]
    arg: str
    wrap: str
    # Plain-text traces calling with inline tags (toolrl.models.warmstart_inline), not chat.
    inline: bool = False

    def arguments(self, expression: str) -> dict[str, str]:
        return {self.arg: self.wrap.format(expression)}

    def expression(self, arguments: Any) -> str | None:
        """The expression inside a call's arguments, or None if they do not have its shape."""
        value = arguments.get(self.arg) if isinstance(arguments, dict) else None
        if value is None:
            return None
        prefix, suffix = self.wrap.split("{}")
        m = re.fullmatch(rf"{re.escape(prefix)}(.*){re.escape(suffix)}", str(value).strip(), re.S)
        return m.group(1) if m else None


TOOL_STYLES: dict[str, ToolStyle] = {
    "calculator": ToolStyle("calculator", CALCULATOR_SCHEMA, "expression", "{}"),
    "python": ToolStyle("python", PYTHON_SCHEMA, "code", "print({})"),
    "calculator_inline": ToolStyle("calculator", CALCULATOR_SCHEMA, "expression", "{}", True),
}


def tool_style(name: str) -> ToolStyle:
    """The style named `name` (a key of TOOL_STYLES); ValueError for any other."""
    if name not in TOOL_STYLES:
        raise ValueError(f"tool must be one of {tuple(TOOL_STYLES)}, got {name!r}")
    return TOOL_STYLES[name]


@dataclass
class WarmStartConfig:
    """The supervised pass: trace mix, copy-friendly initialisation, optimiser and length."""

    steps: int = 400
    batch_size: int = 8
    lr: float = 3e-3
    warmup_steps: int = 20
    min_lr_ratio: float = 0.0  # cosine decay ends at lr * min_lr_ratio
    p_correct: float = 0.3
    p_wrong_op: float = 0.25  # the rest answers with no call
    wrong_op: str = "+"  # "+" or "-"
    # Share of traces whose operands have 1-4 digits (product <= 9999), outside the task's
    # range and so never an eval pair: they exercise copying in every digit place.
    p_wide: float = 0.3
    # Std of the per-(place, digit) vectors number embeddings are built from; 0 disables.
    digit_std: float = 0.2
    # Scale of the copy-friendly value/output init of attention (0 keeps the HF init).
    ov_init: float = 1.0
    seed: int = 0
    # Operand range and eval share: must match the task's, so that eval pairs stay unseen.
    min_operand: int = 10
    max_operand: int = 99
    eval_fraction: float = 0.1
    log_every: int = 50
    # The tool the traces call: "calculator", "python" or "calculator_inline" (plain text with
    # <calc> tags, see ToolStyle and warmstart_inline). Left out of the
    # cache key when "calculator", so the default build kept its folder name.
    tool: str = "calculator"


def _task(cfg: WarmStartConfig) -> ArithmeticTask:
    return ArithmeticTask(
        ArithmeticConfig(
            seed=cfg.seed,
            num_train=1,
            num_eval=1,
            min_operand=cfg.min_operand,
            max_operand=cfg.max_operand,
            eval_fraction=cfg.eval_fraction,
        )
    )


def _call(style: ToolStyle, expression: str) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {"name": style.name, "arguments": style.arguments(expression)},
    }


def _wide_pair(task: ArithmeticTask, rng: random.Random) -> tuple[int, int]:
    """Operands of 1-4 digits whose product is still one token (<= 9999), not both in the
    task's range (so never an eval pair): they exercise copying in every digit place."""
    c = task.cfg
    while True:
        a = int(math.exp(rng.uniform(math.log(2), math.log(5000))))
        b = rng.randint(2, 9999 // a)
        if not (c.min_operand <= min(a, b) and max(a, b) <= c.max_operand):
            return (a, b) if rng.random() < 0.5 else (b, a)


def make_trace(
    task: ArithmeticTask, cfg: WarmStartConfig, rng: random.Random
) -> list[dict[str, Any]]:
    """One synthetic conversation (user, then assistant/tool turns) on a train or wide pair,
    calling the tool of `cfg.tool`."""
    style = tool_style(cfg.tool)
    if rng.random() < cfg.p_wide:
        a, b = _wide_pair(task, rng)
    else:
        a, b = rng.choice(task.pairs("train"))
        a, b = (a, b) if rng.random() < 0.5 else (b, a)
    msgs = list(task.make_prompt(a, b, rng.randrange(len(task.cfg.phrasings))).messages)
    u = rng.random()
    if u < cfg.p_correct + cfg.p_wrong_op:
        op = "*" if u < cfg.p_correct else cfg.wrong_op
        result = {"*": a * b, "+": a + b, "-": a - b}[op]
        call = _call(style, f"{a} {op} {b}")
        msgs.append({"role": "assistant", "content": "", "tool_calls": [call]})
        msgs.append({"role": "tool", "name": style.name, "content": str(result)})
        msgs.append({"role": "assistant", "content": ANSWER.format(result)})
    else:
        guess = a * b
        while guess == a * b:
            guess = rng.randint(100, 9999)
        msgs.append({"role": "assistant", "content": ANSWER.format(guess)})
    return msgs


def corpus_texts(tokenizer: Any, cfg: WarmStartConfig, n: int) -> list[str]:
    """Rendered synthetic conversations: the corpus the tokenizer's text merges are learned on."""
    if tool_style(cfg.tool).inline:
        from toolrl.models import warmstart_inline

        return warmstart_inline.corpus_texts(cfg, n)
    task, rng = _task(cfg), random.Random(f"corpus:{cfg.seed}")
    tools = [tool_style(cfg.tool).schema]
    return [
        tokenizer.apply_chat_template(make_trace(task, cfg, rng), tools=tools, tokenize=False)
        for _ in range(n)
    ]


def encode_trace(
    tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]]
) -> tuple[list[int], list[int]]:
    """(ids, mask) of a rendered conversation; mask is 1 on assistant-sampled ids.

    An assistant turn's sampled ids run from after `<|im_start|>assistant\\n` through its
    `<|im_end|>`; the "\\n" after it is template glue (mask 0), as in a rollout.
    """
    text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False)
    ids = tokenizer.encode(text, add_special_tokens=False)
    header = tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)
    end_id = tokenizer.eos_token_id
    mask = [0] * len(ids)
    i, h = 0, len(header)
    while i < len(ids):
        if ids[i : i + h] == header:
            i += h
            while i < len(ids):
                mask[i] = 1
                i += 1
                if ids[i - 1] == end_id:
                    break
        else:
            i += 1
    return ids, mask


def _batch(
    tokenizer: Any, task: ArithmeticTask, cfg: WarmStartConfig, rng: random.Random
) -> tuple[torch.Tensor, torch.Tensor]:
    """A right-padded batch: ids [B, T] and mask [B, T] (1 where the id is a training target)."""
    tools = [tool_style(cfg.tool).schema]
    if tool_style(cfg.tool).inline:
        from toolrl.models.warmstart_inline import trace

        rows = [trace(task, cfg, rng, tokenizer) for _ in range(cfg.batch_size)]
    else:
        rows = [
            encode_trace(tokenizer, make_trace(task, cfg, rng), tools)
            for _ in range(cfg.batch_size)
        ]
    T = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), T), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for r, (x, m) in enumerate(rows):
        ids[r, : len(x)] = torch.tensor(x)
        mask[r, : len(m)] = torch.tensor(m)
    return ids, mask


def _lr_at(step: int, cfg: WarmStartConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


class DigitEmbedding(torch.nn.Module):
    """Number-token embeddings tied to their digits during the warm-start.

    The embedding of an integer token is the sum of one learned vector per (place, digit),
    places counted from the units, with an "absent" digit for short numbers:
    e(47) = D[units][7] + D[tens][4] + D[hundreds][-] + D[thousands][-]. Every number then
    learns from every copy of any number, so copying generalises to numbers the warm-start
    never showed (most products are rare); tied embeddings make the output side factorise
    over digits the same way. After training the sums are written into the plain embedding
    matrix: the saved model is an ordinary transformers model.
    """

    PLACES, SYMBOLS = 4, 11  # units..thousands; digits 0-9 and "absent"

    def __init__(self, tokenizer: Any, hidden: int, std: float) -> None:
        super().__init__()
        ids, rows = [], []
        for tok, i in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
            if tok.isascii() and tok.isdigit() and (tok == "0" or tok[0] != "0") and len(tok) <= 4:
                digits = [int(c) for c in reversed(tok)] + [10] * (self.PLACES - len(tok))
                ids.append(i)
                rows.append([p * self.SYMBOLS + d for p, d in enumerate(digits)])
        self.register_buffer("ids", torch.tensor(ids))  # [N]
        self.register_buffer("rows", torch.tensor(rows))  # [N, 4]
        self.table = torch.nn.Parameter(torch.randn(self.PLACES * self.SYMBOLS, hidden) * std)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """weight [V, H] -> the same with number rows replaced by their digit sums."""
        return weight.index_copy(0, self.ids, self.table[self.rows].sum(1))  # [V, H]


def loss_on_batch(
    model: Any, ids: torch.Tensor, mask: torch.Tensor, digits: DigitEmbedding | None = None
) -> torch.Tensor:
    """Mean next-token loss over targets where mask is 1. ids, mask: [B, T].

    The vocabulary is large (every number is a token), so the LM head runs only on the
    positions that predict a masked-in target. Embeddings are tied: one matrix in and out.
    """
    emb = model.model.embed_tokens.weight  # [V, H]
    if digits is not None:
        emb = digits(emb)
    hidden = model.model(inputs_embeds=F.embedding(ids, emb)).last_hidden_state  # [B, T, H]
    sel = mask[:, 1:].bool()  # [B, T-1]: position t predicts ids[t+1]
    logits = hidden[:, :-1][sel] @ emb.T  # [N, V]
    return F.cross_entropy(logits, ids[:, 1:][sel])


@torch.no_grad()
def init_copy_heads(model: Any, scale: float) -> None:
    """Start every attention head as a copier: W_O W_V is a scaled projection.

    The rows of each layer's v_proj are orthonormal and each head's slice of o_proj is the
    transpose of its kv group's rows, so a head that attends to a position writes (a
    projection of) that token's embedding into the residual. With tied embeddings that
    already scores the attended token highest; training only has to learn *where* to look,
    which a tiny model does in tens of steps instead of thousands (measured: see
    bench/warmstart_modes.py).
    """
    cfg = model.config
    hd = cfg.hidden_size // cfg.num_attention_heads
    rep = cfg.num_attention_heads // cfg.num_key_value_heads
    for layer in model.model.layers:
        attn = layer.self_attn
        q, _ = torch.linalg.qr(torch.randn(cfg.hidden_size, cfg.hidden_size))
        v = q[: cfg.num_key_value_heads * hd]  # [KV*hd, H], orthonormal rows
        o = torch.cat(
            [v[(h // rep) * hd : (h // rep + 1) * hd].T for h in range(cfg.num_attention_heads)], 1
        )
        attn.v_proj.weight.copy_(v * scale)
        attn.o_proj.weight.copy_(o * scale / rep)  # [H, heads*hd]


def warm_start(model: Any, tokenizer: Any, cfg: WarmStartConfig) -> dict[str, float]:
    """Train `model` in place on synthetic traces; return timing and the last losses.

    Deterministic for a given config and thread count: without deterministic algorithms
    the CPU backward passes differed between two runs in the 8th digit.
    """
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        return _train(model, tokenizer, cfg)
    finally:
        torch.use_deterministic_algorithms(previous)


def _train(model: Any, tokenizer: Any, cfg: WarmStartConfig) -> dict[str, float]:
    torch.manual_seed(cfg.seed)
    rng = random.Random(f"warmstart:{cfg.seed}")
    task = _task(cfg)
    if cfg.ov_init:
        init_copy_heads(model, cfg.ov_init)
    digits = None
    if cfg.digit_std:
        digits = DigitEmbedding(tokenizer, model.config.hidden_size, cfg.digit_std)
    params = list(model.parameters()) + (list(digits.parameters()) if digits else [])
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.98), weight_decay=0.0)
    model.train()
    t0, recent = time.perf_counter(), []
    for step in range(cfg.steps):
        ids, mask = _batch(tokenizer, task, cfg, rng)
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg)
        loss = loss_on_batch(model, ids, mask, digits)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        recent = (recent + [loss.item()])[-20:]
        if cfg.log_every and (step + 1) % cfg.log_every == 0:
            log.info(
                "warm-start step %d/%d loss %.3f", step + 1, cfg.steps, sum(recent) / len(recent)
            )
    if digits is not None:  # write the digit sums into the plain (tied) embedding matrix
        with torch.no_grad():
            emb = model.model.embed_tokens.weight
            emb.copy_(digits(emb))
    model.eval()
    return {"seconds": time.perf_counter() - t0, "final_loss": sum(recent) / max(1, len(recent))}


# ---------------------------------------------------------------------------- measurement

_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)
_EXPR = re.compile(r"^\s*(-?\d+)\s*([-+*/])\s*(-?\d+)\s*$")


def _parse_call(text: str, style: ToolStyle) -> tuple[str, str] | None:
    """(name, expression) of the first tool call in `text`, or None if it is malformed (not
    JSON, or its arguments not of the style's shape, e.g. python code that is not print(...))."""
    m = _CALL.search(text)
    try:
        call = json.loads(m.group(1)) if m else None
        expression = style.expression(call["arguments"])
        return None if expression is None else (str(call["name"]), expression)
    except (TypeError, KeyError, ValueError):
        return None


@torch.no_grad()
def _sample_ids(
    model: Any, tokenizer: Any, prompts: list[list[int]], max_new: int
) -> list[list[int]]:
    """Temperature-1 samples (no top-k/top-p) of one assistant turn per prompt: the new ids,
    through the end-of-turn id when sampled."""
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    T = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (T - len(p)) + p for p in prompts])  # [B, T], left-padded
    starts = torch.tensor([T - len(p) for p in prompts])  # [B]
    attn = (torch.arange(T)[None, :] >= starts[:, None]).long()  # [B, T]
    out = model.generate(
        input_ids=ids,
        attention_mask=attn,
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=max_new,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    rows = []
    for row in out[:, T:].tolist():
        rows.append(row[: row.index(eos) + 1] if eos in row else row)
    return rows


def _classify(text: str, a: int, b: int, style: ToolStyle) -> tuple[str, str | None, bool | None]:
    """(mode, expression to run or None, operands copied right or None) of a first turn."""
    if "<tool_call>" not in text:
        return "no_call", None, None
    call = _parse_call(text, style)
    m = _EXPR.match(call[1]) if call and call[0] == style.name else None
    if m is None:
        return "malformed", call[1] if call else None, None
    ok = (int(m.group(1)), int(m.group(3))) == (a, b)
    if m.group(2) != "*":
        return "wrong_operator", call[1], ok
    return ("correct_call" if ok else "wrong_operands"), call[1], ok


def measure_modes(
    model: Any,
    tokenizer: Any,
    task: ArithmeticTask | None = None,
    n: int = 200,
    seed: int = 0,
    tool: str = "calculator",
) -> dict[str, float]:
    """Sample one episode per eval prompt at temperature 1 (call, tool, answer) and report the
    behaviour mix, the copy accuracies and the mean reward.

    `tool` is the style the model was warm-started with; its schema is rendered. The tool is
    stood in for by the calculator on the call's expression (for python, the inside of
    `print(...)`): no model text is executed.
    """
    from toolrl.rollout.chat import ChatBuilder
    from toolrl.rollout.trajectory import ToolResult
    from toolrl.tools.calculator import Calculator

    task = task or ArithmeticTask()
    prompts = task.prompts("eval")[:n]
    style = tool_style(tool)
    tools, calc = [style.schema], Calculator()
    chat = ChatBuilder(tokenizer, tools)  # the tool answer's ids exactly as a rollout adds them
    torch.manual_seed(seed)
    model.eval()
    ids0 = [
        tokenizer.encode(
            tokenizer.apply_chat_template(
                p.messages, tools=tools, tokenize=False, add_generation_prompt=True
            ),
            add_special_tokens=False,
        )
        for p in prompts
    ]
    turn1 = _sample_ids(model, tokenizer, ids0, max_new=48)
    modes, finals, ops_ok, res_ok, second = [], [], [], [], []
    for i, (p, new) in enumerate(zip(prompts, turn1, strict=True)):
        a, b = (int(x) for x in re.findall(r"\d+", p.messages[0]["content"]))
        text = tokenizer.decode(new, skip_special_tokens=False)
        mode, expr, ok = _classify(text, a, b, style)
        modes.append(mode)
        finals.append(tokenizer.decode(new, skip_special_tokens=True))
        if ok is not None:
            ops_ok.append(ok)
        if expr is not None:
            result, _ = asyncio.run(calc.call("measure", {"expression": expr}))
            answer_ids = chat.tool_turn_ids([ToolResult(style.name, result)])
            second.append((i, result, ids0[i] + new + answer_ids))
    if second:
        turn2 = _sample_ids(model, tokenizer, [s[2] for s in second], max_new=24)
        for (i, result, _), new in zip(second, turn2, strict=True):
            finals[i] = tokenizer.decode(new, skip_special_tokens=True)
            if re.fullmatch(r"-?\d+", result):
                res_ok.append(last_integer(finals[i]) == int(result))
    rewards = [task.reward(f, p.answer) for f, p in zip(finals, prompts, strict=True)]
    stats = {
        f"frac_{k}": modes.count(k) / len(modes)
        for k in ("correct_call", "wrong_operator", "wrong_operands", "malformed", "no_call")
    }
    stats["operand_copy_acc"] = sum(ops_ok) / max(1, len(ops_ok))
    stats["result_copy_acc"] = sum(res_ok) / max(1, len(res_ok))
    stats["mean_reward"] = sum(rewards) / len(rewards)
    stats["n"] = float(len(prompts))
    return stats
