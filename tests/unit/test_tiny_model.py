"""Unit tests for the embedded model: tokenizer, chat template, cache, determinism, warm-start.

Builds use small configs and few warm-start steps, so the file runs in well under a minute
on 2 cores.

    python -m pytest tests/unit/test_tiny_model.py
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from toolrl.data.arithmetic import ArithmeticTask
from toolrl.models import tiny
from toolrl.models import warmstart as ws
from toolrl.models.tiny import EmbeddedModelConfig, build_embedded_model
from toolrl.models.warmstart import WarmStartConfig

SMALL = EmbeddedModelConfig(
    hidden_size=64,
    num_heads=2,
    num_kv_heads=1,
    intermediate_size=128,
    corpus_conversations=60,
    warmstart=WarmStartConfig(steps=4, batch_size=2, log_every=0),
)
TOOLS = ArithmeticTask().tools_schemas


def _call(expr: str, as_string: bool = False) -> dict[str, Any]:
    args: Any = {"expression": expr}
    return {
        "type": "function",
        "function": {"name": "calculator", "arguments": json.dumps(args) if as_string else args},
    }


CONVERSATION: list[dict[str, Any]] = [
    {"role": "user", "content": "What is 47 * 83?"},
    {"role": "assistant", "content": "", "tool_calls": [_call("47 * 83")]},
    {"role": "tool", "name": "calculator", "content": "3901"},
    {"role": "assistant", "content": "Checking.", "tool_calls": [_call("47 + 83"), _call("1 / 0")]},
    {"role": "tool", "name": "calculator", "content": "130"},
    {"role": "tool", "name": "calculator", "content": "Error: division by zero"},
    {"role": "assistant", "content": "The answer is 3901."},
    {"role": "user", "content": "Thanks! ünïcødé <b>"},
    {"role": "assistant", "content": "You are welcome."},
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_embedded_model(SMALL, cache_dir=tmp_path_factory.mktemp("cache"), warm_start=False)


@pytest.fixture(scope="module")
def tok(model_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(model_dir)  # as vLLM and the rollout load it


# ---------------------------------------------------------------------------- tokenizer


def test_every_integer_up_to_9999_is_one_token(tok: Any) -> None:
    numbers = [str(n) for n in range(10_000)]
    encoded = tok(numbers, add_special_tokens=False)["input_ids"]
    assert all(len(ids) == 1 for ids in encoded)
    assert len({ids[0] for ids in encoded}) == 10_000
    assert tok.decode([encoded[3901][0]]) == "3901"


def test_digit_runs_split_in_chunks_of_four_without_the_space(tok: Any) -> None:
    assert tok.tokenize("123456789") == ["1234", "5678", "9"]
    assert tok.tokenize("is 47") == ["is", "Ġ", "47"]
    assert tok.tokenize('"47 * 83"') == ['"', "47", "Ġ*", "Ġ", "83", '"']


@pytest.mark.parametrize(
    "text",
    [
        "What is 47 * 83?",
        '{"name": "calculator", "arguments": {"expression": "12345 - 0007"}}',
        "line one\n\n  indented\ttab  ",
        "ünïcødé — 数字 😀",
        "<|im_start|>user\nhi<|im_end|>\n<tool_call>\n{}\n</tool_call>",
    ],
)
def test_round_trip(tok: Any, text: str) -> None:
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_control_tokens(tok: Any) -> None:
    for t in (*tiny.SPECIAL_TOKENS, *tiny.TOOL_TOKENS):
        assert len(tok.encode(t, add_special_tokens=False)) == 1, t
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok.bos_token is None
    ids = tok.encode("<tool_call>\n{}\n</tool_call><|im_end|>", add_special_tokens=False)
    # tool tokens are not special: they survive skipping special tokens, the turn end does not
    assert tok.decode(ids, skip_special_tokens=True) == "<tool_call>\n{}\n</tool_call>"
    assert tok.encode("hi", add_special_tokens=True) == tok.encode("hi", add_special_tokens=False)


def test_tokenizer_and_model_load_with_auto_classes(model_dir: Path, tok: Any) -> None:
    assert tok.tokenize("4127") == ["4127"]  # not re-split by a model-specific tokenizer class
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    cfg = model.config
    assert cfg.tie_word_embeddings and model.lm_head.weight is model.get_input_embeddings().weight
    assert cfg.vocab_size == len(tok) and cfg.eos_token_id == tok.eos_token_id
    assert cfg.head_dim in (32, 64, 80, 96, 112, 128)  # head sizes vLLM's CPU attention supports
    assert model.dtype == torch.float32
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json"):
        assert (model_dir / name).is_file()


# ---------------------------------------------------------------------------- chat template


def _render(tok: Any, msgs: list[dict[str, Any]], gen: bool = False, tools: Any = TOOLS) -> str:
    return tok.apply_chat_template(msgs, tools=tools, tokenize=False, add_generation_prompt=gen)


def test_template_renders_tools_calls_and_grouped_responses(tok: Any) -> None:
    text = _render(tok, CONVERSATION[:7])
    system = text.split("<|im_end|>")[0]
    assert system.startswith("<|im_start|>system\n") and "<tools>\n" in system
    assert json.dumps(TOOLS[0]) in system
    assert (
        "<|im_start|>user\nWhat is 47 * 83?<|im_end|>\n"
        "<|im_start|>assistant\n<tool_call>\n"
        '{"name": "calculator", "arguments": {"expression": "47 * 83"}}\n'
        "</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\n3901\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\nChecking.\n<tool_call>\n"
        '{"name": "calculator", "arguments": {"expression": "47 + 83"}}\n</tool_call>\n'
        "<tool_call>\n"
        '{"name": "calculator", "arguments": {"expression": "1 / 0"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n130\n</tool_response>\n"
        "<tool_response>\nError: division by zero\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\nThe answer is 3901.<|im_end|>\n"
    ) in text
    assert text.endswith("The answer is 3901.<|im_end|>\n")
    assert _render(tok, CONVERSATION[:1], gen=True).endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_template_without_tools_and_with_system(tok: Any) -> None:
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert _render(tok, msgs, tools=None) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
    )
    with_tools = _render(tok, msgs)
    assert with_tools.startswith("<|im_start|>system\nBe brief.\n# Tools\n<tools>")
    assert with_tools.count("<|im_start|>system") == 1


def test_arguments_given_as_json_string_render_the_same(tok: Any) -> None:
    as_dict = [CONVERSATION[0], {"role": "assistant", "tool_calls": [_call("2 * 3")]}]
    as_str = [
        CONVERSATION[0],
        {"role": "assistant", "tool_calls": [_call("2 * 3", as_string=True)]},
    ]
    assert _render(tok, as_dict) == _render(tok, as_str)


@pytest.mark.parametrize("tools", [TOOLS, None])
def test_template_is_append_only(tok: Any, tools: Any) -> None:
    full = _render(tok, CONVERSATION, tools=tools)
    for k in range(1, len(CONVERSATION)):
        if CONVERSATION[k - 1]["role"] == CONVERSATION[k]["role"] == "tool":
            continue  # consecutive tool answers share one turn: only a whole group is a message
        assert full.startswith(_render(tok, CONVERSATION[:k], tools=tools)), k
        if CONVERSATION[k]["role"] == "assistant":
            assert full.startswith(_render(tok, CONVERSATION[:k], gen=True, tools=tools)), k


def test_rollout_token_builder_appends_exactly_the_template_ids(tok: Any) -> None:
    from toolrl.rollout.chat import ChatBuilder
    from toolrl.rollout.trajectory import ToolResult

    builder = ChatBuilder(tok, TOOLS)
    ids = builder.prompt_ids(CONVERSATION[:1])
    # what the engine samples: the call turn through <|im_end|>, without the glue "\n"
    turn = _render(tok, CONVERSATION[:2])[len(_render(tok, CONVERSATION[:1], gen=True)) :]
    assert turn.endswith("<|im_end|>\n")
    ids += tok.encode(turn[:-1], add_special_tokens=False)
    ids += builder.tool_turn_ids([ToolResult("calculator", "3901")])
    expected = tok.encode(_render(tok, CONVERSATION[:3], gen=True), add_special_tokens=False)
    assert ids == expected


# ---------------------------------------------------------------------------- build and cache


def test_cache_returns_the_same_folder_at_once(model_dir: Path) -> None:
    stamp = (model_dir / "model.safetensors").stat().st_mtime_ns
    t0 = time.perf_counter()
    again = build_embedded_model(SMALL, cache_dir=model_dir.parent.parent, warm_start=False)
    assert again == model_dir and time.perf_counter() - t0 < 1.0
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == stamp
    assert not [p for p in model_dir.parent.iterdir() if p.is_dir() and p.name.startswith(".")]


def test_cache_key_follows_the_config() -> None:
    assert tiny.config_hash(SMALL) == tiny.config_hash(EmbeddedModelConfig(**vars(SMALL)))
    other = EmbeddedModelConfig(**{**vars(SMALL), "seed": 1})
    assert tiny.config_hash(SMALL) != tiny.config_hash(other)


PY_SMALL = dataclasses.replace(SMALL, warmstart=dataclasses.replace(SMALL.warmstart, tool="python"))


def test_tool_styles_build_side_by_side(model_dir: Path) -> None:
    """The python-style variant gets its own cache folder next to the calculator one."""
    assert tiny.config_hash(PY_SMALL) != tiny.config_hash(SMALL)
    py_dir = build_embedded_model(PY_SMALL, cache_dir=model_dir.parent.parent, warm_start=False)
    assert py_dir.parent == model_dir.parent and py_dir != model_dir
    assert (py_dir / "config.json").is_file() and (model_dir / "config.json").is_file()
    info = json.loads((py_dir / "toolrl_build.json").read_text())
    assert info["config"]["warmstart"]["tool"] == "python"
    py_tok = AutoTokenizer.from_pretrained(py_dir)
    assert py_tok.tokenize("4127") == ["4127"]
    assert tiny.embedded_config("python").warmstart.tool == "python"
    with pytest.raises(ValueError, match="calculator"):
        tiny.embedded_config("bash")


def test_default_build_keeps_its_folder_name() -> None:
    # The default run's measured learning curve refers to this build; adding the tool style
    # must not have renamed (or rebuilt) it. Change it only on purpose, and re-measure.
    assert tiny.config_hash(EmbeddedModelConfig()) == "9ab2b9f6e0046959"
    assert tiny.config_hash(tiny.embedded_config("calculator")) == "9ab2b9f6e0046959"


def test_model_config_selects_the_embedded_tool(model_dir: Path) -> None:
    from toolrl.config import Config, ConfigError, ModelConfig
    from toolrl.validate import validate

    def config(tool: str, tools: tuple[str, ...], path: str = "embedded") -> Config:
        specs = {
            "calculator": {"_target_": "toolrl.tools.calculator.Calculator"},
            "search": {"_target_": "toolrl.tools.search.SearchTool"},
            "python": {"_target_": "toolrl.tools.calculator.Calculator"},  # any importable tool
        }
        model = ModelConfig(path=path, embedded_tool=tool)
        reward = {"product": {"_target_": "toolrl.data.arithmetic.product_reward"}}
        return Config(model=model, tools={t: specs[t] for t in tools}, reward=reward)

    validate(config("calculator", ("calculator",)))
    validate(config("python", ("python",)))
    validate(config("calculator", ("search",)))  # another task's tool: no opinion
    validate(config("python", ("calculator",), path=str(model_dir)))  # ignored for a folder
    with pytest.raises(ConfigError, match="model.embedded_tool: is 'bash'"):
        validate(config("bash", ("calculator",)))
    with pytest.raises(ConfigError, match="set model.embedded_tool=python"):
        validate(config("calculator", ("python",)))
    with pytest.raises(ConfigError, match="set model.embedded_tool=calculator"):
        validate(config("python", ("calculator", "search")))


def test_env_var_names_the_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TOOLRL_CACHE", str(tmp_path))
    assert tiny.default_cache_dir() == tmp_path


def test_failed_build_leaves_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def broken(out: Path, cfg: EmbeddedModelConfig, warm_start: bool) -> dict[str, Any]:
        (out / "config.json").write_text("{}")  # half-written folder
        raise RuntimeError("crash mid-build")

    monkeypatch.setattr(tiny, "_build_into", broken)
    with pytest.raises(RuntimeError, match="crash"):
        build_embedded_model(SMALL, cache_dir=tmp_path)
    assert [p for p in (tmp_path / "models").iterdir() if p.is_dir()] == []


def test_builds_are_deterministic(tmp_path: Path) -> None:
    a = build_embedded_model(SMALL, cache_dir=tmp_path / "a")
    b = build_embedded_model(SMALL, cache_dir=tmp_path / "b")
    assert a.name == b.name and a != b
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    # the warm-start changed the random init
    init = load_file(
        build_embedded_model(SMALL, cache_dir=tmp_path / "a", warm_start=False)
        / "model.safetensors"
    )
    assert not all(torch.equal(wa[k], init[k]) for k in wa)


# ---------------------------------------------------------------------------- warm-start


def test_encode_trace_masks_exactly_the_assistant_turns(tok: Any) -> None:
    ids, mask = ws.encode_trace(tok, CONVERSATION[:3] + [CONVERSATION[6]], TOOLS)
    assert len(ids) == len(mask) and set(mask) == {0, 1}
    assert ids == tok.encode(
        _render(tok, CONVERSATION[:3] + [CONVERSATION[6]]), add_special_tokens=False
    )
    spans, cur = [], []
    for i, m in zip(ids, mask, strict=True):
        if m:
            cur.append(i)
        elif cur:
            spans.append(tok.decode(cur))
            cur = []
    assert spans == [
        '<tool_call>\n{"name": "calculator", "arguments": {"expression": "47 * 83"}}\n'
        "</tool_call><|im_end|>",
        "The answer is 3901.<|im_end|>",
    ]


@pytest.mark.parametrize(("p_correct", "op"), [(1.0, "*"), (0.0, "+")])
def test_python_style_trace_calls_python(tok: Any, p_correct: float, op: str) -> None:
    cfg = WarmStartConfig(tool="python", p_correct=p_correct, p_wrong_op=1.0, p_wide=0.0)
    msgs = ws.make_trace(ws._task(cfg), cfg, random.Random(0))
    a, b = (int(x) for x in re.findall(r"\d+", msgs[0]["content"]))
    result = a * b if op == "*" else a + b
    assert msgs[2] == {"role": "tool", "name": "python", "content": str(result)}
    ids, mask = ws.encode_trace(tok, msgs, [ws.PYTHON_SCHEMA])
    text = tok.decode(ids)
    assert json.dumps(ws.PYTHON_SCHEMA) in text.split("<|im_end|>")[0]
    assert "calculator" not in text
    sampled = tok.decode([i for i, m in zip(ids, mask, strict=True) if m])
    assert sampled == (
        f'<tool_call>\n{{"name": "python", "arguments": {{"code": "print({a} {op} {b})"}}}}\n'
        f"</tool_call><|im_end|>The answer is {result}.<|im_end|>"
    )
    assert f"<tool_response>\n{result}\n</tool_response>" in text


def test_rl_tools_render_the_schema_the_model_was_warmed_on() -> None:
    # The RL prompt renders each tool's schema(); it must be the one warm-start showed.
    from toolrl.tools.calculator import Calculator
    from toolrl.tools.python_exec import PythonTool

    python = PythonTool(pool_size=0, sandbox={"isolation": "none"})
    assert python.schema() == ws.tool_style("python").schema
    assert Calculator().schema() == ws.tool_style("calculator").schema


def test_measurement_reads_python_calls_without_running_them() -> None:
    py, calc = ws.tool_style("python"), ws.tool_style("calculator")

    def turn(name: str, args: dict[str, Any]) -> str:
        return f"<tool_call>\n{json.dumps({'name': name, 'arguments': args})}\n</tool_call>"

    assert ws._classify(turn("python", {"code": "print(47 * 83)"}), 47, 83, py) == (
        "correct_call",
        "47 * 83",
        True,
    )
    assert ws._classify(turn("python", {"code": " print(47 + 83)\n"}), 47, 83, py)[:2] == (
        "wrong_operator",
        "47 + 83",
    )
    assert ws._classify(turn("python", {"code": "print(74 * 83)"}), 47, 83, py)[0] == (
        "wrong_operands"
    )
    # not print(<expression>), or the other style's call: malformed, never executed
    assert ws._classify(turn("python", {"code": "47 * 83"}), 47, 83, py) == (
        "malformed",
        None,
        None,
    )
    assert ws._classify(turn("python", {"code": "import os"}), 47, 83, py)[1] is None
    assert ws._classify(turn("calculator", {"expression": "47 * 83"}), 47, 83, py)[0] == (
        "malformed"
    )
    assert ws._classify(turn("python", {"code": "print(47 * 83)"}), 47, 83, calc)[0] == (
        "malformed"
    )
    assert ws._classify(turn("calculator", {"expression": "47 * 83"}), 47, 83, calc)[0] == (
        "correct_call"
    )
    assert ws._classify("The answer is 3901.", 47, 83, py) == ("no_call", None, None)


def test_digit_embedding_is_a_sum_over_places(tok: Any) -> None:
    digits = ws.DigitEmbedding(tok, 16, std=1.0)
    assert len(digits.ids) == 10_000
    out = digits(torch.zeros(len(tok), 16))
    d, absent = digits.table, ws.DigitEmbedding.SYMBOLS - 1

    def row(place: int, digit: int) -> torch.Tensor:
        return d[place * ws.DigitEmbedding.SYMBOLS + digit]

    i47 = tok.convert_tokens_to_ids("47")
    assert torch.allclose(out[i47], row(0, 7) + row(1, 4) + row(2, absent) + row(3, absent))
    assert torch.equal(out[tok.convert_tokens_to_ids("Ġanswer")], torch.zeros(16))


def test_warm_start_learns_to_copy_numbers(tmp_path: Path) -> None:
    """A short warm-start of the default-size model copies operands and results it never saw."""
    cfg = EmbeddedModelConfig(
        corpus_conversations=100, warmstart=WarmStartConfig(steps=90, log_every=0)
    )
    corpus = ws.corpus_texts(tiny.bootstrap_tokenizer(), cfg.warmstart, cfg.corpus_conversations)
    tok = tiny.build_tokenizer(corpus, cfg.text_merges)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny.model_config(cfg, tok))
    ws.warm_start(model, tok, cfg.warmstart)
    task = ArithmeticTask()
    hits, total = torch.zeros(3), 0
    for p in task.prompts("eval")[:24]:
        a, b = (int(x) for x in re.findall(r"\d+", p.messages[0]["content"]))
        msgs = p.messages + [
            {"role": "assistant", "content": "", "tool_calls": [_call(f"{a} * {b}")]},
            {"role": "tool", "name": "calculator", "content": str(a * b)},
            {"role": "assistant", "content": f"The answer is {a * b}."},
        ]
        ids, mask = ws.encode_trace(tok, msgs, task.tools_schemas)
        with torch.no_grad():
            pred = model(torch.tensor([ids])).logits[0, :-1].argmax(-1)  # [T-1]
        slots = [
            t for t in range(len(ids) - 1) if mask[t + 1] and tok.decode([ids[t + 1]]).isdigit()
        ]
        assert [tok.decode([ids[t + 1]]) for t in slots] == [str(a), str(b), str(a * b)]
        hits += torch.tensor([float(pred[t] == ids[t + 1]) for t in slots])
        total += 1
    acc = hits / total  # operand a, operand b, result
    assert acc.min() >= 0.9, acc.tolist()


def test_default_model_behaviour_mix(embedded_model: str) -> None:
    """The shipped default: step-0 reward in RL's sweet spot, copies nearly perfect."""
    path = embedded_model  # the cached default build, shared with the integration tests
    model = AutoModelForCausalLM.from_pretrained(path)
    stats = ws.measure_modes(model, AutoTokenizer.from_pretrained(path), n=200, seed=0)
    assert 0.15 <= stats["mean_reward"] <= 0.4, stats
    assert stats["operand_copy_acc"] >= 0.95 and stats["result_copy_acc"] >= 0.95, stats
    assert stats["frac_no_call"] >= 0.3 and stats["frac_wrong_operator"] >= 0.1, stats
