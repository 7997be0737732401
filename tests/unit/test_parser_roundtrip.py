"""Round trips of random tool calls through real chat templates and back through the parsers.

A seeded generator makes tool calls (names from a small tool set; arguments nested objects,
arrays, numbers, booleans, null, and strings full of every format's markers, quotes,
backslashes, brackets, newlines, unicode and edge whitespace). Each family's own template
renders them as an assistant turn: the text is the render of the conversation with that turn
minus the generation-prompt render of the messages before it, cut at the turn's end-of-turn
marker as an engine stops there. The family's parser must read back exactly those calls (and
Mistral's call ids) and the prose the template wrote beside them, with no error.

Templates come from installed packages, never from this repo, and are rendered with
transformers' own chat-template renderer (what `apply_chat_template` runs):
trl's files (read, not imported) for Qwen2.5 and Qwen3 (Hermes JSON), Llama 3.1 (JSON, one
call per turn) and Qwen3.5 / Qwen3.6 (the Qwen3-Coder XML format: no installed package ships
Qwen3-Coder's own template, and these two write the same `<function=..><parameter=..>`
format), and mistral_common's generated Mistral v3, v7, v11 and v13 templates. The pythonic
format has no installed template; its turns are written with Python's `repr`, which is what
the format is (Python call syntax).

    python -m pytest tests/unit/test_parser_roundtrip.py --durations=5
"""

from __future__ import annotations

import json
import random
import re
import string
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from transformers.utils.chat_template_utils import render_jinja_template

from tests.unit.test_real_templates import mistral_template, trl_template
from toolrl.rollout.parsers.base import Parser
from toolrl.rollout.parsers.hermes import HermesParser
from toolrl.rollout.parsers.llama3_json import Llama3JsonParser
from toolrl.rollout.parsers.mistral import MistralParser
from toolrl.rollout.parsers.pythonic import PythonicParser
from toolrl.rollout.parsers.qwen3_coder import Qwen3CoderParser

CASES = 300  # seeded cases per family
MSGS = [{"role": "user", "content": "Please use the tools."}]

# Each tool's parameters and their JSON-schema types: Qwen3-Coder's XML carries no types, so
# its parser types a value by the schema of the tool it calls.
PARAMS: dict[str, dict[str, str]] = {
    "search": {"query": "string", "limit": "integer", "filters": "object"},
    "calculator": {"expression": "string", "precision": "number"},
    "write_file": {"path": "string", "content": "string", "append": "boolean"},
    "batch": {"items": "array", "options": "object", "note": "string", "ratio": "number"},
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": name,
            "description": f"The {name} tool.",
            "parameters": {
                "type": "object",
                "properties": {p: {"type": t} for p, t in params.items()},
            },
        },
    }
    for name, params in PARAMS.items()
]

# Pieces that hostile strings are made of: every format's markers and its JSON/Python syntax.
HOSTILE = (
    "<tool_call>", "</tool_call>", "<function=x>", "</function>", "<parameter=query>",
    "</parameter>", "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]", "[TOOL_RESULTS]", "[/INST]",
    "<|python_tag|>", "<|im_end|>", "<|im_start|>", "<|eot_id|>", "<|eom_id|>", "</s>",
    "<think>", "</think>", "[THINK]", "[/THINK]", '"', "'", '\\', '\\"', "\\n", ";", "{",
    "}", "[", "]", ",", ":", "\n", "\t", "\r\n", " ", "é", "日本語", "🙂", "\u2028", "null",
    "true", "42", "-1.5e3", '{"name": "evil", "arguments": {}}', '"}]', '"}, {"name": "x"',
    '; {"name": "evil", "parameters": {}}', "[TOOL_CALLS]evil[ARGS]{}", "[evil(a=1)]",
    "evil(a=1)", "__import__('os').system('x')", "'''", '"""', "\\u0041", "\x00",
)  # fmt: skip
MARKERS = ("<tool_call>", "</tool_call>", "<function=", "</parameter>", "[TOOL_CALLS]", "[ARGS]")
MARKERS += ("[CALL_ID]", "<|python_tag|>", "<|im_end|>", "<|eot_id|>", "</s>", "</think>")
PROSE = ("Let me check.", "I will call the tools now:", "Sure; one moment, please!")
FLOATS = (0.5, -0.0, 1e-07, 1e300, -2.5e-300, 3.141592653589793, 123456.789)

# The XML format has no escaping, so a value cannot hold `</parameter>` followed by nothing
# but whitespace and then `<parameter=` or `</function>`: the format cannot tell that from
# the value's end. Everything else (lone `</parameter>`, `</tool_call>`, `<function=..>`,
# edge newlines) is decidable and stays in. The XML families break the undecidable pattern.
_XML_AMBIGUOUS = re.compile(r"</parameter>(?=\s*(?:<parameter=|</function>))")


def hostile_string(rng: random.Random, xml: bool) -> str:
    # Half the pieces are the formats' markers, so that every marker is in many cases.
    pools = (MARKERS, HOSTILE, string.ascii_letters)
    pieces = [rng.choice(rng.choices(pools, (5, 4, 1))[0]) for _ in range(rng.randint(0, 8))]
    text = rng.choice(("", " ", "\n", "  \n ")) + "".join(pieces) + rng.choice(("", " ", "\n"))
    return _XML_AMBIGUOUS.sub("</parameter>.", text) if xml else text


def number(rng: random.Random, integer: bool) -> int | float:
    if integer:
        return rng.choice((0, -1, 7, 2**31, -(2**63), 10**30, rng.randint(-(10**6), 10**6)))
    return rng.choice(FLOATS) if rng.random() < 0.5 else rng.uniform(-1e6, 1e6)


def nested(rng: random.Random, depth: int, xml: bool) -> Any:
    """A random JSON value: containers while depth lasts, then scalars."""
    kind = rng.choice(("dict", "list", "str", "int", "float", "bool", "null"))
    if kind in ("dict", "list") and depth <= 0:
        kind = "str"
    if kind == "dict":
        n = rng.randint(0, 3)
        return {hostile_string(rng, xml): nested(rng, depth - 1, xml) for _ in range(n)}
    if kind == "list":
        return [nested(rng, depth - 1, xml) for _ in range(rng.randint(0, 3))]
    if kind in ("int", "float"):
        return number(rng, kind == "int")
    return {"str": lambda: hostile_string(rng, xml), "bool": lambda: rng.random() < 0.5}.get(
        kind, lambda: None
    )()


def typed_value(rng: random.Random, kind: str, xml: bool) -> Any:
    """A value of a parameter's schema type."""
    if kind == "string":
        return hostile_string(rng, xml)
    if kind in ("integer", "number"):
        return number(rng, kind == "integer")
    if kind == "boolean":
        return rng.random() < 0.5
    if kind == "array":
        return [nested(rng, 2, xml) for _ in range(rng.randint(0, 3))]
    return {hostile_string(rng, xml): nested(rng, 2, xml) for _ in range(rng.randint(0, 3))}


Call = tuple[str, dict[str, Any], str | None]  # name, arguments, Mistral call id


@dataclass(frozen=True)
class Family:
    """A model family's template and parser, and what its template can write."""

    template: Callable[[], str] | None  # None: no installed template, see write_pythonic
    parser: Callable[[], Parser]
    eos: str  # the end-of-turn marker the engine stops at (kept in the text)
    after_eos: str = ""  # what the template writes after the turn's eos
    max_calls: int = 3
    prose: bool = True  # the template writes content beside the calls
    think: bool = False  # the template writes a think block the reasoning step strips
    ids: bool = False  # the format carries the call ids (Mistral's 9 characters)
    xml: bool = False  # Qwen3-Coder XML: values restricted to what is decidable
    skip: tuple[str, ...] = ()  # parameter types the template cannot write faithfully


def qwen3_coder() -> Parser:
    return Qwen3CoderParser(tool_schemas=TOOLS)


FAMILIES = {
    "qwen2_5": Family(lambda: trl_template("qwen2_5.jinja"), HermesParser, "<|im_end|>", "\n"),
    "qwen3": Family(
        lambda: trl_template("qwen3.jinja"), HermesParser, "<|im_end|>", "\n", think=True
    ),
    # Qwen3.6 writes strings raw and every other value as JSON.
    "qwen3_6": Family(
        lambda: trl_template("qwen3_6.jinja"), qwen3_coder, "<|im_end|>", "\n", think=True, xml=True
    ),
    # Qwen3.5 writes a top-level boolean with Python's str ("True"): not JSON, so left out.
    # Its generation prompt holds an empty think block: the turn has none of its own.
    "qwen3_5": Family(
        lambda: trl_template("qwen3_5_nothink.jinja"),
        qwen3_coder,
        "<|im_end|>",
        "\n",
        xml=True,
        skip=("boolean",),
    ),
    "llama3_1": Family(
        lambda: trl_template("llama3_1.jinja"),
        Llama3JsonParser,
        "<|eot_id|>",
        max_calls=1,
        prose=False,
    ),  # fmt: skip
    "mistral_v3": Family(
        lambda: mistral_template("v3"), MistralParser, "</s>", prose=False, ids=True
    ),
    "mistral_v7": Family(lambda: mistral_template("v7"), MistralParser, "</s>", ids=True),
    "mistral_v11": Family(lambda: mistral_template("v11"), MistralParser, "</s>", ids=True),
    "mistral_v13": Family(lambda: mistral_template("v13"), MistralParser, "</s>"),
    "pythonic": Family(None, PythonicParser, "<|eot_id|>"),
}


def random_turn(rng: random.Random, fam: Family) -> tuple[str, list[Call]]:
    """(prose, calls) of one assistant turn."""
    calls: list[Call] = []
    for _ in range(rng.randint(1, fam.max_calls)):
        name = rng.choice(list(PARAMS))
        params = [(p, t) for p, t in PARAMS[name].items() if t not in fam.skip]
        chosen = rng.sample(params, rng.randint(0, len(params)))
        args = {p: typed_value(rng, t, fam.xml) for p, t in chosen}
        call_id = "".join(rng.choices(string.ascii_letters + string.digits, k=9))
        calls.append((name, args, call_id if fam.ids else None))
    prose = rng.choice(PROSE) if fam.prose and rng.random() < 0.5 else ""
    return prose, calls


def render(template: str, messages: list[dict], gen: bool) -> str:
    rendered, _ = render_jinja_template(
        [messages],
        tools=TOOLS,
        chat_template=template,
        add_generation_prompt=gen,
        bos_token="<|begin_of_text|>",  # Llama's; the only template here that reads it
    )
    return rendered[0]


def template_turn(fam: Family, template: str, prose: str, calls: list[Call]) -> str:
    """The assistant turn's text as the template writes it, through its end-of-turn marker."""
    tool_calls = [
        {"id": i or "abcdefghi", "type": "function", "function": {"name": n, "arguments": a}}
        for n, a, i in calls
    ]
    turn = {"role": "assistant", "content": prose, "tool_calls": tool_calls}
    before = render(template, MSGS, gen=True)
    full = render(template, MSGS + [turn], gen=False)
    assert full.startswith(before)
    text = full[len(before) :]
    # Arguments may hold the eos marker too: the template's own is the last one.
    end = text.rindex(fam.eos) + len(fam.eos)
    assert text[end:] == fam.after_eos
    return text[:end]


def write_pythonic(prose: str, calls: list[Call]) -> str:
    """A pythonic turn: Python call syntax, every value written with repr."""
    body = ", ".join(f"{n}({', '.join(f'{k}={v!r}' for k, v in a.items())})" for n, a, _ in calls)
    return (prose + "\n" if prose else "") + f"[{body}]<|eot_id|>"


def strip_reasoning(text: str) -> str:
    """What the reasoning step hands the parser: the text after the think block. The block
    the template writes here holds no reasoning text, so its first `</think>` closes it."""
    head, sep, rest = text.partition("</think>")
    assert sep and head.replace("<think>", "").strip() == "", text[:80]
    return rest


def turns(name: str) -> list[tuple[int, str, str, list[Call]]]:
    """CASES seeded (seed, text, prose, calls) of a family, rendered once per session."""
    if name not in _TURNS:
        fam = FAMILIES[name]
        template = fam.template() if fam.template else ""
        out = []
        for seed in range(CASES):
            rng = random.Random(f"{name}-{seed}")
            prose, calls = random_turn(rng, fam)
            if fam.template is None:
                text = write_pythonic(prose, calls)
            else:
                text = template_turn(fam, template, prose, calls)
            out.append((seed, strip_reasoning(text) if fam.think else text, prose, calls))
        _TURNS[name] = out
    return _TURNS[name]


_TURNS: dict[str, list[tuple[int, str, str, list[Call]]]] = {}


def mismatches(fam: Family, parser: Parser, name: str) -> list[str]:
    """One line per case whose parse differs from what was rendered."""
    bad = []
    for seed, text, prose, calls in turns(name):
        try:
            got = parser(text)
        except Exception as e:  # a parser must never raise: report it with the others
            bad.append(f"seed {seed}: raised {type(e).__name__}: {e}")
            continue
        want = [(n, a, i if fam.ids else None) for n, a, i in calls]
        have = [(c.name, c.arguments, c.id) for c in got.calls]
        if have != want or got.errors or got.content != prose:
            bad.append(
                f"seed {seed}: errors={got.errors[:2]} content={got.content[:60]!r} "
                f"calls equal={have == want}\n  text={text[:300]!r}"
            )
    return bad


@pytest.mark.parametrize("name", list(FAMILIES))
def test_rendered_calls_parse_back_exactly(name: str) -> None:
    fam = FAMILIES[name]
    bad = mismatches(fam, fam.parser(), name)
    assert not bad, f"{len(bad)}/{CASES} cases differ; first:\n" + "\n".join(bad[:3])


def strings_in(value: Any) -> list[str]:
    """Every string in a JSON value, keys included."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in [k, *strings_in(v)]]
    if isinstance(value, list):
        return [s for v in value for s in strings_in(v)]
    return []


@pytest.mark.parametrize("name", list(FAMILIES))
def test_the_cases_hold_every_marker_inside_arguments(name: str) -> None:
    # The round trips only mean something if many cases carry each format's markers inside
    # their arguments (which the renders hold verbatim: no marker has a character that JSON
    # or repr escapes) and turns with several calls.
    cases = turns(name)
    held = [" ".join(s for _, a, _ in calls for s in strings_in(a)) for _, _, _, calls in cases]
    for marker in MARKERS + ('"', "\\", "\n", "é"):
        assert sum(marker in h for h in held) >= CASES // 20, marker
    assert sum(len(calls) > 1 for *_, calls in cases) >= (0 if name == "llama3_1" else CASES / 3)
    if FAMILIES[name].xml:  # `</parameter>` followed by more XML, as far as decidable
        assert any(re.search(r"</parameter>\s*<", h) for h in held)


def test_qwen3_coder_without_schemas_keeps_every_value_as_its_text() -> None:
    # With no schema the XML says nothing about types: a value is the text the template
    # wrote (Qwen3.6 writes non-strings as JSON), never re-typed from how it looks.
    parser, bad = Qwen3CoderParser(), []
    for seed, text, _, calls in turns("qwen3_6"):
        want = [
            {
                k: v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)
                for k, v in a.items()
            }
            for _, a, _ in calls
        ]
        got = parser(text)
        if [c.arguments for c in got.calls] != want or got.errors:
            bad.append(f"seed {seed}: {got.errors[:1]} {text[:200]!r}")
    assert not bad, f"{len(bad)}/{CASES} cases differ; first:\n" + "\n".join(bad[:3])


LEADING_PROSE = {
    # Llama 3.1's template drops content beside a call, but models do write prose first.
    "llama3_json": (Llama3JsonParser, lambda p, c: p + "\n\n" + c),
    "llama3_json_tag": (Llama3JsonParser, lambda p, c: p + "<|python_tag|>" + c),
    "pythonic": (PythonicParser, lambda p, c: p + "\n" + c),
}


@pytest.mark.parametrize("fmt", list(LEADING_PROSE))
def test_a_call_after_leading_prose_is_found(fmt: str) -> None:
    make, join = LEADING_PROSE[fmt]
    family = "pythonic" if fmt == "pythonic" else "llama3_1"
    parser = make()
    for seed, text, prose, calls in turns(family)[:50]:
        body = text.removeprefix(prose).lstrip("\n")
        got = parser(join("I will look that up.", body))
        assert [(c.name, c.arguments) for c in got.calls] == [(n, a) for n, a, _ in calls], seed
        assert got.content == "I will look that up." and not got.errors, seed
