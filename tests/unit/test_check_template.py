"""`python -m toolrl.check_template` on the embedded model and on folders with real templates.

The real templates are read from installed packages at test time (trl's Llama 3.1 and
Qwen3 files, mistral_common's generated Mistral one) and saved into a temporary model
folder with the embedded tokenizer; nothing is committed or downloaded.

    python -m pytest tests/unit/test_check_template.py
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from toolrl.check_template import main

LLAMA = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
MISTRAL = ["<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]"]
MISTRAL += ["[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[ARGS]", "[CALL_ID]"]


def trl_template_file(name: str) -> Path:
    spec = importlib.util.find_spec("trl")
    assert spec and spec.submodule_search_locations, "pip install --no-deps trl==1.16.0"
    return Path(spec.submodule_search_locations[0]) / "chat_templates" / name


def mistral_v11_template() -> str:
    from mistral_common.integrations.chat_templates.chat_templates import generate_chat_template
    from mistral_common.tokens.tokenizers.base import TokenizerVersion

    flags = ("spm", "image_support", "audio_support", "thinking_support", "plain_thinking_support")
    flags += ("use_special_token_variables",)
    unset = ("default_system_prompt", "model_settings_fields", "reasoning_effort_values")
    unset += ("reasoning_effort_default",)
    kwargs: dict[str, Any] = {**dict.fromkeys(flags, False), **dict.fromkeys(unset)}
    return generate_chat_template(tokenizer_version=TokenizerVersion.v11, **kwargs)


def model_folder(base: str, out: Path, specials: list[str], eos: str, template: str) -> Path:
    """The embedded tokenizer with a family's control tokens, eos and template, saved to `out`."""
    from transformers import AutoTokenizer

    tok: Any = AutoTokenizer.from_pretrained(base)
    tok.add_tokens(specials, special_tokens=True)
    tok.eos_token, tok.bos_token = eos, specials[0]
    tok.chat_template = template
    tok.save_pretrained(out)
    return out


def run(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out + out.err


def test_embedded_model_is_usable(embedded_base: str, capsys) -> None:
    code, out = run(capsys, embedded_base)
    assert code == 0, out
    assert "end-of-turn token: '<|im_end|>'" in out
    assert "tool turns append-only: yes" in out
    glue = "'\\n<|im_start|>user\\n<tool_response>\\nRESULT\\n</tool_response><|im_end|>\\n"
    assert glue + "<|im_start|>assistant\\n' ids=[" in out
    assert "renders tool schemas: yes" in out and "tool output written: as is" in out
    assert "user turns (environment observations) append-only: yes\n" in out
    assert "user turns token-exact with the render: yes (17 texts" in out
    assert "strips reasoning from earlier turns: no" in out
    assert "turns start inside <think> (the prompt opens it): no" in out
    assert "parser: hermes (conf/parser/hermes.yaml" in out and "parses the template's own" in out
    assert out.rstrip().endswith("usable: yes")


def test_real_llama3_1_template_in_a_model_folder(embedded_base: str, tmp_path, capsys) -> None:
    template = trl_template_file("llama3_1.jinja").read_text()
    folder = model_folder(embedded_base, tmp_path / "llama", LLAMA, "<|eot_id|>", template)
    code, out = run(capsys, str(folder))
    assert code == 0, out
    assert "end-of-turn token: '<|eot_id|>'" in out
    assert '<|start_header_id|>ipython<|end_header_id|>\\n\\n"RESULT"<|eot_id|>' in out
    assert "tool output written: JSON string" in out
    assert "parser: llama3_json" in out


def test_a_thinking_template_that_opens_the_block(embedded_base: str, capsys) -> None:
    # Qwen3.5's thinking template ends the generation prompt with "<think>\n"
    code, out = run(
        capsys, embedded_base, "--template", str(trl_template_file("qwen3_5_think.jinja"))
    )
    assert "turns start inside <think> (the prompt opens it): yes" in out, out


def test_template_override_and_refusals(embedded_base: str, tmp_path, capsys) -> None:
    # Qwen3 over the embedded folder: usable, and it drops reasoning of earlier turns
    code, out = run(capsys, embedded_base, "--template", str(trl_template_file("qwen3.jinja")))
    assert code == 0 and "strips reasoning from earlier turns: yes" in out, out
    # Llama 3.1's turns end with <|eot_id|>, not the folder's eos <|im_end|>
    code, out = run(capsys, embedded_base, "--template", str(trl_template_file("llama3_1.jinja")))
    assert code == 1 and "tool turns append-only: no: assistant turns with tool calls" in out
    assert "usable: no: the token builder refuses the template" in out
    # Mistral writes sampled call ids into the tool turn: usable, with a generated id for an
    # answer without one (9 hex digits, toolrl/rollout/chat.py)
    folder = model_folder(embedded_base, tmp_path / "m", MISTRAL, "</s>", mistral_v11_template())
    code, out = run(capsys, str(folder))
    assert code == 0 and "tool output written: as is" in out and "parser: mistral" in out, out
    assert re.search(r"'\[TOOL_RESULTS\][0-9a-f]{9}\[TOOL_CONTENT\]RESULT\[/TOOL_RESULTS\]'", out)


def test_bad_paths_exit_2_and_a_missing_template_exits_1(embedded_base, tmp_path, capsys) -> None:
    assert run(capsys, str(tmp_path / "nope"))[0] == 2
    assert run(capsys, embedded_base, "--template", str(tmp_path / "nope.jinja"))[0] == 2
    assert run(capsys, str(tmp_path))[0] == 2  # a folder without a tokenizer
    folder = model_folder(embedded_base, tmp_path / "bare", LLAMA, "<|eot_id|>", "")
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    code, out = run(capsys, str(folder))
    assert code == 1 and "no chat template" in out, out


def test_runs_as_a_module(embedded_base: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "toolrl.check_template", embedded_base],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "usable: yes" in proc.stdout


def test_tool_answer_seams_on_qwen2_5_real_vocabulary(tmp_path, capsys, monkeypatch) -> None:
    from tests import realtok
    from toolrl.rollout.chat import ChatBuilder

    folder = str(realtok.folder_or_skip("qwen2_5"))
    template = str(trl_template_file("qwen2_5.jinja"))
    code, out = run(capsys, folder, "--template", template)
    assert code == 0 and "tool turns token-exact with the render: yes (17 tool" in out, out
    # The tool turn encoded as toolrl did before: template text and tool text apart. Qwen's
    # vocabulary merges an answer's last "." or "}" with the "\n" after it, and the "\n"
    # around an empty answer, so those answers' ids are not the render's.
    joint = ChatBuilder._encode_turn

    def apart(self: ChatBuilder, parts: list[str]) -> list[int]:
        ids: list[int] = []
        for k, part in enumerate(parts):
            ids += joint(self, [part]) if k % 2 == 0 else self._encode_plain(part)
        return ids

    monkeypatch.setattr(ChatBuilder, "_encode_turn", apart)
    code, out = run(capsys, folder, "--template", template)
    line = next(x for x in out.splitlines() if x.startswith("tool turns token-exact"))
    assert code == 1 and line.startswith("tool turns token-exact with the render: no: "), out
    # answers whose edges are letters (x, " x", é, ".x", "}x") meet "\n" without merging
    differ = ["", "x.", "x}", "x]", "x)", "x ", "\nx\n", "{}", "\n", " ", "(no output)"]
    differ += ["x\n[output truncated: 12 more tokens]"]
    assert line.endswith(f"no: 12 of 17 answers differ: {', '.join(map(repr, differ))}"), line
    assert "a train/serve mismatch" in out.splitlines()[-1]


def test_template_kwargs_and_user_turns(embedded_base: str, tmp_path, capsys) -> None:
    qwen3 = str(trl_template_file("qwen3.jinja"))
    # Qwen3 without thinking: every turn opens and closes an empty think block, which the
    # template leaves out of earlier turns (the builder keeps it)
    kwargs = '{"enable_thinking": false}'
    code, out = run(capsys, embedded_base, "--chat-template", qwen3, "--template-kwargs", kwargs)
    assert code == 0, out
    assert "<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' ids=[" in out
    assert "append-only: yes (earlier turns render without '<think>\\n\\n</think>\\n\\n'" in out
    assert "turns start inside <think> (the prompt opens it): no" in out
    # Mistral v11 writes the tools' schemas before the last user message: tool turns only
    folder = model_folder(embedded_base, tmp_path / "m", MISTRAL, "</s>", mistral_v11_template())
    code, out = run(capsys, str(folder))
    assert code == 0 and "user turns (environment observations) append-only: no: " in out, out
    assert "re-renders the prompt" in out and "user turns token-exact with the render: -" in out
    # arguments that are not a JSON object
    assert run(capsys, embedded_base, "--template-kwargs", "[1]")[0] == 2
    assert run(capsys, embedded_base, "--template-kwargs", "{nope")[0] == 2
