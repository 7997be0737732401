"""Template control: `model.chat_template` (a Jinja file in place of the tokenizer's template)
and `model.chat_template_kwargs` (variables passed to every render), the same way in the token
builder, its probes, the prompt-length count of `main` and the rollout worker's protocol.

The default (no file, no variables) renders exactly as the tokenizer's own template without
arguments, so the default run's ids do not change. Qwen3's template (from trl) with
`enable_thinking: false` ends the generation prompt with an empty think block, which the
builder's generation prompt, tool turns and user turns carry.

    python -m pytest tests/unit/test_template_control.py
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.test_config import load
from tests.unit.test_real_templates import FAMILIES, family_tokenizer, trl_template
from toolrl.config import ConfigError, ModelConfig
from toolrl.rollout.chat import ChatBuilder, read_chat_template, render_chat
from toolrl.rollout.parsers.reasoning import TagReasoning
from toolrl.rollout.trajectory import ToolResult
from toolrl.tools.calculator import CALCULATOR_SCHEMA
from toolrl.validate import validate

MSGS = [{"role": "user", "content": "What is 6 * 7?"}]
EMPTY_THINK = "<think>\n\n</think>\n\n"
NO_THINKING = {"enable_thinking": False}


@pytest.fixture(scope="module")
def qwen3(embedded_base: str):
    f = FAMILIES["qwen3"]
    return family_tokenizer(embedded_base, f.template(), f.specials, f.plain, f.eos)


def test_the_defaults_render_as_the_tokenizers_own_template(embedded_base) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(embedded_base)
    model = ModelConfig()
    assert model.chat_template is None and model.chat_template_kwargs == {}
    assert read_chat_template(model.chat_template) is None
    chat = ChatBuilder(tok, [CALCULATOR_SCHEMA], None, model.chat_template_kwargs)
    plain = tok.apply_chat_template(
        MSGS, tools=[CALCULATOR_SCHEMA], add_generation_prompt=True, tokenize=False
    )
    assert chat.prompt_ids(MSGS) == tok.encode(plain, add_special_tokens=False)
    assert chat.tool_turn_ids([ToolResult("calculator", "42")]) == ChatBuilder(
        tok, [CALCULATOR_SCHEMA]
    ).tool_turn_ids([ToolResult("calculator", "42")])


def test_qwen3_without_thinking_opens_each_turn_with_an_empty_think_block(qwen3) -> None:
    assert ChatBuilder(qwen3, [CALCULATOR_SCHEMA]).generation_prompt == "<|im_start|>assistant\n"
    plain = ChatBuilder(qwen3, [CALCULATOR_SCHEMA], template_kwargs=NO_THINKING)
    # the template's own generation prompt with enable_thinking=false
    raw = qwen3.apply_chat_template(MSGS, add_generation_prompt=True, tokenize=False, **NO_THINKING)
    assert raw.endswith("<|im_start|>assistant\n" + EMPTY_THINK)
    assert plain.generation_prompt == "<|im_start|>assistant\n" + EMPTY_THINK
    assert not TagReasoning().opened_by(plain.generation_prompt)  # the block is closed
    assert plain.decode(plain.prompt_ids(MSGS)).endswith(EMPTY_THINK)
    # every turn continues the same header: after tool answers and after an observation
    assert plain.decode(plain.tool_turn_ids([ToolResult("calculator", "42")])).endswith(EMPTY_THINK)
    assert plain.decode(plain.user_turn_ids("Too high.")).endswith(EMPTY_THINK)
    # earlier turns render without it; the trajectory keeps what the turn was sampled after
    assert plain.history_header == "<|im_start|>assistant\n"
    assert plain.history_drops == EMPTY_THINK


def test_qwen3_without_thinking_trajectory_is_the_render_plus_the_kept_blocks(qwen3) -> None:
    chat = ChatBuilder(qwen3, [CALCULATOR_SCHEMA], template_kwargs=NO_THINKING)
    reply = qwen3.encode("About 40.", add_special_tokens=False) + [chat.turn_end_id]
    ids = chat.prompt_ids(MSGS) + reply + chat.user_turn_ids("Too high. ") + reply
    conv = MSGS + [{"role": "assistant", "content": "About 40."}]
    conv += [
        {"role": "user", "content": "Too high. "},
        {"role": "assistant", "content": "About 40."},
    ]
    full = chat.render(conv, generation_prompt=False)
    # the template drops the empty block of the earlier turn only; the trajectory has it
    earlier = "<|im_start|>assistant\nAbout 40."
    assert full.count(earlier) == 1
    kept = full.replace(earlier, "<|im_start|>assistant\n" + EMPTY_THINK + "About 40.")
    assert qwen3.decode(ids) + "\n" == kept
    assert ids + qwen3.encode("\n") == qwen3.encode(kept, add_special_tokens=False)


def test_a_template_file_replaces_the_tokenizers_template(embedded_base, tmp_path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(embedded_base)
    own = tok.chat_template
    path = tmp_path / "custom.jinja"
    marker = "You are Toolrl-custom, created by"
    path.write_text(trl_template("qwen2_5.jinja").replace("You are Qwen, created by", marker))
    assert marker in path.read_text()
    text = read_chat_template(path)
    chat = ChatBuilder(tok, [CALCULATOR_SCHEMA], chat_template=text)
    assert tok.chat_template == own  # the tokenizer itself is left alone
    assert marker in chat.decode(chat.prompt_ids(MSGS))
    assert marker not in tok.decode(ChatBuilder(tok, [CALCULATOR_SCHEMA]).prompt_ids(MSGS))
    assert chat.render(MSGS) == render_chat(tok, MSGS, True, [CALCULATOR_SCHEMA], text)
    # and the run's prompt-length count renders with the same template
    from toolrl.main import token_counter

    count = token_counter(tok, text)
    no_tools = render_chat(tok, MSGS, True, None, text)
    assert count(MSGS) == len(tok.encode(no_tools, add_special_tokens=False))
    assert count(MSGS) > token_counter(tok)(MSGS)


def test_the_rollout_worker_builds_its_protocol_with_the_template_kwargs(qwen3) -> None:
    from toolrl.workers.rollout import build_protocol

    spec = {"_target_": "toolrl.rollout.protocols.chat.ChatToolTurns"}
    parser = {"_target_": "toolrl.rollout.parsers.hermes.HermesParser"}
    protocol = build_protocol(spec, parser, qwen3, [CALCULATOR_SCHEMA], NO_THINKING)
    assert protocol.chat.template_kwargs == NO_THINKING
    assert protocol.chat.generation_prompt.endswith(EMPTY_THINK)


def test_config_keys_and_validation(tmp_path: Path) -> None:
    cfg = load("+model.chat_template_kwargs.enable_thinking=false")
    assert cfg.model.chat_template_kwargs == NO_THINKING and cfg.model.chat_template is None
    validate(cfg)
    path = tmp_path / "t.jinja"
    path.write_text("{{ messages }}")
    validate(load(f"model.chat_template={path}"))
    with pytest.raises(ConfigError, match=r"^model\.chat_template: .*nope\.jinja' is not a file"):
        validate(load(f"model.chat_template={tmp_path / 'nope.jinja'}"))
    with pytest.raises(ConfigError, match=r"^model\.chat_template_kwargs: tools are set by"):
        validate(load("+model.chat_template_kwargs.tools=1"))
