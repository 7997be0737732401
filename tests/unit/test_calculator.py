"""Unit tests for the calculator tool.

Run `python -m pytest tests/unit/test_calculator.py`.
"""

from __future__ import annotations

import asyncio
import inspect
import re
from typing import Any

import pytest

import toolrl.tools.calculator as calculator_module
from toolrl.tools.base import Tool
from toolrl.tools.calculator import (
    CALCULATOR_SCHEMA,
    CalcError,
    Calculator,
    format_number,
)


def run(arguments: Any, calc: Calculator | None = None) -> tuple[str, bool]:
    return asyncio.run((calc or Calculator()).call("traj-0", arguments))


def calc(expression: str) -> tuple[str, bool]:
    return run({"expression": expression})


def test_is_a_tool_with_the_shared_schema() -> None:
    tool = Calculator()
    assert isinstance(tool, Tool)
    assert tool.name == "calculator"
    assert tool.schema() == CALCULATOR_SCHEMA
    tool.schema()["function"]["name"] = "changed"  # callers get a copy
    assert CALCULATOR_SCHEMA["function"]["name"] == "calculator"
    asyncio.run(tool.open("t"))
    asyncio.run(tool.close("t"))


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("3901", "3901"),
        ("47 * 83", "3901"),
        ("6/3", "2"),
        ("-6/3", "-2"),
        ("7/2", "3.5"),
        ("1/3", "0.3333333333"),
        ("2/3", "0.6666666667"),
        ("7//2", "3"),
        ("-7//2", "-4"),
        ("7 % 3", "1"),
        ("-7 % 3", "2"),
        ("2**10", "1024"),
        ("2**-2", "0.25"),
        ("2**0.5", "1.414213562"),
        ("0.1 + 0.2", "0.3"),
        ("2.5 * 2", "5"),
        ("1.5 - 1.5", "0"),
        ("-0.0", "0"),
        ("1e-7", "1e-07"),
        ("1e20 + 0.5", "1e+20"),
        ("123456789 * 987654321", "121932631112635269"),
        ("10**29", "1" + "0" * 29),
        ("  12 + 1  ", "13"),
        ("--3", "3"),
        ("+4", "4"),
        ("1_000 + 1", "1001"),
        ("(-1)**(10**29)", "1"),
        ("0**0", "1"),
    ],
)
def test_values(expression: str, expected: str) -> None:
    assert calc(expression) == (expected, True)


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("2 + 3 * 4", "14"),
        ("(2 + 3) * 4", "20"),
        ("2 ** 3 ** 2", "512"),  # ** is right-associative
        ("-2 ** 2", "-4"),  # unary minus binds looser than **
        ("(-2) ** 2", "4"),
        ("10 - 4 - 3", "3"),  # - is left-associative
        ("100 / 10 / 5", "2"),
        ("2 * 3 % 4", "2"),
        ("1 + 2 * 3 - 4 / 2", "5"),
        ("((1 + 2) * (3 + 4)) // 5", "4"),
    ],
)
def test_precedence(expression: str, expected: str) -> None:
    assert calc(expression) == (expected, True)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({}, 'missing argument "expression"'),
        ({"expression": 12}, '"expression" must be a string, got int'),
        ({"expression": None}, "must be a string"),
        ({"expression": "1", "precision": 3}, "unknown argument(s) ['precision']"),
        ({"expr": "1"}, "unknown argument(s) ['expr']"),
        ({"expression": "   "}, "empty expression"),
        ({"expression": "1+" * 101 + "1"}, "longer than 200 characters"),
        ([1, 2], "arguments must be an object"),
    ],
)
def test_argument_errors(arguments: Any, message: str) -> None:
    text, ok = run(arguments)
    assert not ok
    assert text.startswith("Error: ") and message in text


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("2 +", "invalid syntax"),
        ("(1 + 2", "invalid syntax"),
        ("1 2", "invalid syntax"),
        ("1\x00", "invalid syntax"),
        ("x + 1", "names are not allowed ('x')"),
        ("abs(-1)", "function calls are not allowed"),
        ("__import__('os').system('true')", "function calls are not allowed"),
        ("(1).real", "attributes are not allowed"),
        ("2 ^ 3", "operator ^ is not allowed (use ** for powers)"),
        ("2 << 3", "operator << is not allowed"),
        ("~1", "UnaryOp is not allowed"),
        ("not 1", "UnaryOp is not allowed"),
        ("1 < 2", "Compare is not allowed"),
        ("[1, 2]", "List is not allowed"),
        ("1, 2", "Tuple is not allowed"),
        ("'a' * 3", "'a' is not a number"),
        ("True + 1", "True is not a number"),
        ("2j", "2j is not a number"),
        ("1 if 1 else 2", "IfExp is not allowed"),
        ("(y := 3)", "NamedExpr is not allowed"),
        ("lambda: 1", "Lambda is not allowed"),
        ("1 / 0", "division by zero"),
        ("1 // 0", "division by zero"),
        ("1 % 0", "division by zero"),
        ("1.5 / 0.0", "division by zero"),
        ("0 ** -1", "division by zero"),
        ("(-8) ** 0.5", "not a real number"),
        ("(-8) ** (1/3)", "not a real number"),
    ],
)
def test_expression_errors(expression: str, message: str) -> None:
    text, ok = calc(expression)
    assert not ok
    assert text.startswith("Error: ") and message in text


@pytest.mark.parametrize(
    "expression",
    [
        "9**9**9",
        "10**10**10",
        "2**(2**(2**(2**10)))",
        "10**30",  # exactly 31 digits
        "1" * 31,  # a literal that is too long
        "1e30",
        "1e400",  # parses as inf
        "99999999999999999 * 9999999999999999",
        "(10**15) * (10**15)",
        "(10**29) * (10**29) * (10**29)",
        "1.5 ** (10**29)",  # float overflow
        "2.0 ** 100",
        "10**29 + 10**29 * 9",
    ],
)
def test_bounds_refuse_huge_numbers(expression: str) -> None:
    text, ok = calc(expression)
    assert (text, ok) == (
        "Error: number too large: values are limited to 30 digits",
        False,
    )


def test_bounds_follow_the_config() -> None:
    small = Calculator(max_digits=3, max_expression_chars=10)
    assert run({"expression": "999"}, small) == ("999", True)
    assert run({"expression": "999+1"}, small)[1] is False
    assert run({"expression": "31*33"}, small)[1] is False
    assert run({"expression": "2**10"}, small)[1] is False
    assert run({"expression": "1+1+1+1+1+1"}, small)[0].endswith("longer than 10 characters")
    with pytest.raises(ValueError):
        Calculator(max_digits=0)


def test_power_is_refused_before_computing() -> None:
    # 9**(9**9) would have ~370 million digits; the bit-length estimate refuses it without
    # trying, so evaluate returns at once (computing it would take minutes and gigabytes).
    with pytest.raises(CalcError, match="limited to 30 digits"):
        Calculator().evaluate("9**9**9 - 9**9**9 + 1")
    with pytest.raises(CalcError, match="limited to 30 digits"):
        Calculator().evaluate("(10**15 + 1) * (10**15 + 1)")


def test_format_number() -> None:
    assert format_number(12) == "12"
    assert format_number(-3.0) == "-3"
    assert format_number(2.0**60) == "1.152921505e+18"
    assert format_number(1 / 7) == "0.1428571429"


def test_module_never_uses_eval_or_exec() -> None:
    source = inspect.getsource(calculator_module)
    assert not re.search(r"\b(eval|exec|compile)\s*\(", source)
    assert "__import__" not in source
