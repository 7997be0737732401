"""Calculator tool: safe, bounded evaluation of arithmetic expressions.

The model calls `calculator` with {"expression": "..."}. The expression is parsed with
Python's `ast` and walked with an allow-list: numbers (integers and decimals), the binary
operators + - * / // % **, unary minus and plus, and parentheses. Nothing is ever
evaluated by Python itself, so names, calls and attributes cannot run.

Bounds, each returned to the model as "Error: ...":
- the expression is at most `max_expression_chars` characters;
- every number, given or computed, has at most `max_digits` integer digits; an integer
  `*` or `**` that would exceed it is refused from the operands' bit lengths before it is
  computed, so `9**9**9` fails at once (this also bounds the exponent);
- division or modulo by zero, and results that are not real numbers.

Output rule: integers print as plain integers ("3901"); `/` of integers that divides
exactly gives an integer ("6/3" -> "2"); a float that is integral and below 2**53 prints
as an integer ("2.5*2" -> "5"); any other float prints with at most 10 significant digits
(format ".10g": "1/3" -> "0.3333333333", "1e20+0.5" -> "1e+20").

Run `python -m pytest tests/unit/test_calculator.py` to exercise it.
"""

from __future__ import annotations

import ast
import copy
import math
import operator
from dataclasses import dataclass
from typing import Any, ClassVar

from toolrl.tools.base import StatelessTool

CALCULATOR_SCHEMA: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression.",
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string"}},
            "required": ["expression"],
        },
    },
}

Number = int | float

_OPERATORS: dict[type[ast.operator], Any] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}
_ALLOWED = "use numbers, + - * / // % ** and parentheses"
# Symbols for operators Python parses but the calculator refuses, so the model sees "^".
_REFUSED_SYMBOLS = {
    ast.BitXor: "^",
    ast.BitAnd: "&",
    ast.BitOr: "|",
    ast.LShift: "<<",
    ast.RShift: ">>",
    ast.MatMult: "@",
}


class CalcError(Exception):
    """A mistake in the call or the expression; the message is shown to the model."""


@dataclass
class Calculator(StatelessTool):
    """The calculator tool. `call` returns (result text, True) or ("Error: why", False)."""

    max_digits: int = 30
    max_expression_chars: int = 200
    name: ClassVar[str] = "calculator"

    def __post_init__(self) -> None:
        if self.max_digits < 1 or self.max_expression_chars < 1:
            raise ValueError("max_digits and max_expression_chars must be >= 1")
        self._limit = 10**self.max_digits  # every |value| must stay below this
        self._limit_bits = self._limit.bit_length()

    @staticmethod
    def preflight(**kwargs: Any) -> None:
        """Its argument checks, run by config validation before Ray starts."""
        Calculator(**kwargs)

    def schema(self) -> dict[str, Any]:
        return copy.deepcopy(CALCULATOR_SCHEMA)

    async def call(self, traj_key: str, arguments: dict[str, Any]) -> tuple[str, bool]:
        try:
            value = self.evaluate(self._expression(arguments))
        except CalcError as e:
            return f"Error: {e}", False
        return format_number(value), True

    def evaluate(self, expression: str) -> Number:
        """Evaluate an expression string; raises CalcError with a message for the model."""
        try:
            tree = ast.parse(expression.strip(), mode="eval")
        except SyntaxError as e:
            raise CalcError(f"invalid syntax: {e.msg}") from None
        except (ValueError, RecursionError, MemoryError):
            raise CalcError("invalid syntax") from None
        return self._eval(tree.body)

    def _expression(self, arguments: Any) -> str:
        if not isinstance(arguments, dict):
            raise CalcError('arguments must be an object {"expression": "..."}')
        unknown = sorted(str(k) for k in arguments if k != "expression")
        if unknown:
            raise CalcError(f'unknown argument(s) {unknown}; the only argument is "expression"')
        if "expression" not in arguments:
            raise CalcError('missing argument "expression"')
        expression = arguments["expression"]
        if not isinstance(expression, str):
            raise CalcError(f'"expression" must be a string, got {type(expression).__name__}')
        if not expression.strip():
            raise CalcError("empty expression")
        if len(expression) > self.max_expression_chars:
            raise CalcError(f"expression is longer than {self.max_expression_chars} characters")
        return expression

    def _eval(self, node: ast.expr) -> Number:
        if isinstance(node, ast.Constant):
            if type(node.value) not in (
                int,
                float,
            ):  # bool, complex, str, ... are refused
                raise CalcError(f"{node.value!r} is not a number; {_ALLOWED}")
            return self._check(node.value)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            value = self._eval(node.operand)
            return -value if isinstance(node.op, ast.USub) else value
        if isinstance(node, ast.BinOp):
            left, right = self._eval(node.left), self._eval(node.right)
            return self._check(self._binop(node.op, left, right))
        raise CalcError(_disallowed(node))

    def _binop(self, op: ast.operator, a: Number, b: Number) -> Number:
        try:
            if isinstance(op, ast.Pow):
                return self._pow(a, b)
            if isinstance(op, ast.Div):
                return _divide(a, b)
            if isinstance(op, ast.Mult) and isinstance(a, int) and isinstance(b, int):
                # |a*b| >= 2**(bits(a) + bits(b) - 2): refuse before multiplying.
                self._refuse_if_over(a.bit_length() + b.bit_length() - 1)
            fn = _OPERATORS.get(type(op))
            if fn is None:
                symbol = _REFUSED_SYMBOLS.get(type(op), type(op).__name__)
                hint = " (use ** for powers)" if symbol == "^" else ""
                raise CalcError(f"operator {symbol} is not allowed{hint}; {_ALLOWED}")
            return fn(a, b)
        except ZeroDivisionError:
            raise CalcError("division by zero") from None
        except OverflowError:
            raise CalcError(self._too_big()) from None

    def _pow(self, base: Number, exponent: Number) -> Number:
        if isinstance(base, int) and isinstance(exponent, int) and exponent > 0 and abs(base) > 1:
            # |base| >= 2**(bits-1), so base**exponent has at least (bits-1)*exponent+1 bits.
            self._refuse_if_over((base.bit_length() - 1) * exponent + 1)
        result = base**exponent  # other cases are bounded: floats, |base| <= 1, exponent <= 0
        if isinstance(result, complex):
            raise CalcError("the result is not a real number")
        return result

    def _refuse_if_over(self, min_result_bits: int) -> None:
        if min_result_bits > self._limit_bits:
            raise CalcError(self._too_big())

    def _check(self, value: Number) -> Number:
        if isinstance(value, float) and not math.isfinite(value):
            raise CalcError(self._too_big())
        if abs(value) >= self._limit:
            raise CalcError(self._too_big())
        return value

    def _too_big(self) -> str:
        return f"number too large: values are limited to {self.max_digits} digits"


def _divide(a: Number, b: Number) -> Number:
    """True division that stays an exact integer when integers divide evenly."""
    if isinstance(a, int) and isinstance(b, int):
        quotient, remainder = divmod(a, b)  # raises ZeroDivisionError for b == 0
        if remainder == 0:
            return quotient
    return a / b


def _disallowed(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return f"names are not allowed ({node.id!r}); {_ALLOWED}"
    if isinstance(node, ast.Call):
        return f"function calls are not allowed; {_ALLOWED}"
    if isinstance(node, ast.Attribute):
        return f"attributes are not allowed; {_ALLOWED}"
    return f"{type(node).__name__} is not allowed; {_ALLOWED}"


def format_number(value: Number) -> str:
    """Render a result for the model (the rule is in the module docstring)."""
    if isinstance(value, int):
        return str(value)
    if value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return f"{value:.10g}"
