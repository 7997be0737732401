"""Unit tests for FunctionTool: schema derivation, argument validation, sync/async/raising calls.

Run `python -m pytest tests/unit/test_function_tool.py`.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any, Literal, Optional

import pytest

from toolrl.tools.base import Tool
from toolrl.tools.function import FunctionTool, parse_docstring, to_text, word_count


def lookup(
    city: str,
    days: int,
    units: Literal["metric", "imperial"] = "metric",
    scale: float = 1.0,
    tags: list[str] | None = None,
    extra: dict[str, int] | None = None,
    verbose: bool = False,
    note: Optional[str] = None,  # noqa: UP045 - the old spelling must work too
) -> dict[str, Any]:
    """Look up a forecast for a city.

    This second paragraph is not part of the description.

    Args:
        city: Name of the city.
        days (int): How many days ahead,
            counted from today.
        units: Unit system.

    Returns:
        The forecast.
    """
    return {"city": city, "days": days, "units": units, "tags": tags or []}


async def slow_add(a: int, b: int = 2) -> int:
    """Add two integers, asynchronously."""
    await asyncio.sleep(0.01)
    return a + b


def explode(x: int) -> None:
    """Always fails."""
    raise ValueError(f"bad x {x}")


def call(tool: FunctionTool, arguments: Any) -> tuple[str, bool]:
    return asyncio.run(tool.call("traj-0", arguments))


def test_schema_from_signature_and_docstring() -> None:
    tool = FunctionTool(lookup)
    assert isinstance(tool, Tool)
    assert tool.name == "lookup"
    fn = tool.schema()["function"]
    assert fn["name"] == "lookup"
    assert fn["description"] == "Look up a forecast for a city."
    params = fn["parameters"]
    assert params["type"] == "object"
    assert params["required"] == ["city", "days"]
    props = params["properties"]
    assert props["city"] == {"type": "string", "description": "Name of the city."}
    assert props["days"] == {
        "type": "integer",
        "description": "How many days ahead, counted from today.",
    }
    assert props["units"] == {
        "enum": ["metric", "imperial"],
        "type": "string",
        "description": "Unit system.",
        "default": "metric",
    }
    assert props["scale"] == {"type": "number", "default": 1.0}
    assert props["tags"] == {"type": "array", "items": {"type": "string"}, "default": None}
    assert props["extra"]["type"] == "object"
    assert props["extra"]["additionalProperties"] == {"type": "integer"}
    assert props["verbose"] == {"type": "boolean", "default": False}
    assert props["note"] == {"type": "string", "default": None}
    tool.schema()["function"]["name"] = "changed"  # callers get a copy
    assert tool.schema()["function"]["name"] == "lookup"


def test_dotted_path_and_name_override() -> None:
    tool = FunctionTool("toolrl.tools.function.word_count", name="count_words")
    assert tool.fn is word_count
    assert tool.schema()["function"]["name"] == "count_words"
    assert tool.schema()["function"]["parameters"]["required"] == ["text"]
    assert call(tool, {"text": "a b A c", "unique": True}) == ("3", True)
    with pytest.raises((ImportError, AttributeError)):
        FunctionTool("toolrl.tools.function.no_such_function")


def test_parse_docstring_without_args() -> None:
    assert parse_docstring("One line.\nsecond line.\n\nMore.") == ("One line. second line.", {})
    assert parse_docstring(None) == ("", {})


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"days": 1}, "missing required argument(s) ['city']"),
        ({"city": "Oslo", "days": 1, "colour": "red"}, "unknown argument(s) ['colour']"),
        ({"city": "Oslo", "days": "3"}, 'argument "days": expected integer, got str'),
        ({"city": "Oslo", "days": True}, 'argument "days": expected integer, got bool'),
        ({"city": "Oslo", "days": 1, "units": "kelvin"}, "expected one of ['metric', 'imperial']"),
        ({"city": "Oslo", "days": 1, "tags": ["a", 2]}, 'argument "tags": item 1'),
        ({"city": "Oslo", "days": 1, "tags": "a"}, "expected array, got str"),
        ({"city": "Oslo", "days": 1, "verbose": "yes"}, "expected boolean, got str"),
        (["Oslo", 1], "arguments must be an object"),
    ],
)
def test_validation_errors_are_text(arguments: Any, message: str) -> None:
    text, ok = call(FunctionTool(lookup), arguments)
    assert not ok
    assert text.startswith("Error: ")
    assert message in text


def test_valid_call_returns_json() -> None:
    tool = FunctionTool(lookup)
    text, ok = call(tool, {"city": "Oslo", "days": 2, "scale": 3, "tags": ["x"], "note": None})
    assert ok
    assert text == '{"city": "Oslo", "days": 2, "units": "metric", "tags": ["x"]}'


def test_async_function() -> None:
    tool = FunctionTool(slow_add)
    assert call(tool, {"a": 40}) == ("42", True)
    assert call(tool, {"a": 1, "b": 1.5}) == (
        'Error: argument "b": expected integer, got float',
        False,
    )


def test_raising_function_is_error_text() -> None:
    assert call(FunctionTool(explode), {"x": 3}) == ("Error: ValueError: bad x 3", False)


def test_sync_function_runs_off_the_event_loop() -> None:
    seen: list[int] = []

    def blocking(seconds: float) -> str:
        seen.append(threading.get_ident())
        time.sleep(seconds)
        return "done"

    async def main() -> tuple[list[tuple[str, bool]], float]:
        tool = FunctionTool(blocking)
        start = time.perf_counter()
        results = await asyncio.gather(*(tool.call(f"t{i}", {"seconds": 0.3}) for i in range(3)))
        return list(results), time.perf_counter() - start

    results, elapsed = asyncio.run(main())
    assert results == [("done", True)] * 3
    assert threading.get_ident() not in seen
    assert elapsed < 0.8  # three 0.3 s sleeps overlapped instead of running one after another


def test_to_text() -> None:
    assert to_text("plain") == "plain"
    assert to_text([1, {"a": None}]) == '[1, {"a": null}]'
    assert to_text({1, 2}).startswith("{")  # a set is not JSON: str()
    assert to_text(None) == "null"


def test_open_close_are_noops() -> None:
    tool = FunctionTool(word_count)
    asyncio.run(tool.open("t"))
    asyncio.run(tool.close("t"))
    assert call(tool, {"text": "one two"}) == ("2", True)
