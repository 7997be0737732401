"""Plain Python functions as tools: the schema comes from the signature and the docstring.

`FunctionTool(fn)` wraps a function given as a callable or as a dotted path
"pkg.module.func", so YAML can name it:

    tools:
      word_count:
        _target_: toolrl.tools.function.FunctionTool
        fn: toolrl.tools.function.word_count

The OpenAI function schema is derived from the type hints (str, int, float, bool,
list[...], dict[...], Literal[...], Optional / `X | None`, other unions; a parameter with
a default is not required) and the docstring (first paragraph = description; Google-style
`Args:` lines = parameter descriptions). A call validates the arguments against the
signature (unknown names, missing required ones, wrong basic types) and returns
"Error: ..." text with ok=False instead of raising; so does a function that raises.
Sync functions run in a thread (`asyncio.to_thread`) so they do not block the event loop;
async functions are awaited. The return value becomes text: a str as is, else JSON when it
serialises, else `str()`.

Run `python -m pytest tests/unit/test_function_tool.py` to exercise it.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import json
import re
import types
import typing
from collections.abc import Callable
from typing import Any, Literal, Union

from toolrl.tools.base import StatelessTool

_BASIC: dict[type, str] = {
    str: "string",
    int: "integer",
    float: "number",
    bool: "boolean",
    list: "array",
    tuple: "array",
    dict: "object",
}
_ARG_LINE = re.compile(r"^(\*{0,2}\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$")


def word_count(text: str, unique: bool = False) -> int:
    """Count the words in a text.

    Args:
        text: The text to count words in.
        unique: Count each distinct (lowercased) word once.
    """
    words = text.lower().split() if unique else text.split()
    return len(set(words)) if unique else len(words)


def resolve_callable(fn: str | Callable[..., Any]) -> Callable[..., Any]:
    """Return `fn` itself, or import the dotted path "pkg.module.func" (or "pkg.module:func")."""
    if callable(fn):
        return fn
    if not isinstance(fn, str) or not fn.strip():
        raise TypeError(f"fn must be a callable or a dotted path, got {fn!r}")
    module_name, sep, attr = fn.replace(":", ".").rpartition(".")
    if not sep:
        raise ValueError(f"fn {fn!r} is not a dotted path 'pkg.module.func'")
    target = getattr(importlib.import_module(module_name), attr)
    if not callable(target):
        raise TypeError(f"{fn!r} is not callable")
    return target


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (Union, types.UnionType)


def json_schema(hint: Any) -> dict[str, Any]:
    """JSON schema of one type hint; unknown or missing hints give {} (anything)."""
    if hint is inspect.Parameter.empty or hint is Any:
        return {}
    if hint in _BASIC:
        return {"type": _BASIC[hint]}
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        kinds = {_BASIC.get(type(a)) for a in args}
        out: dict[str, Any] = {"enum": list(args)}
        if len(kinds) == 1 and None not in kinds:
            out["type"] = kinds.pop()
        return out
    if _is_union(hint):
        members = [a for a in args if a is not type(None)]
        if len(members) == 1:  # Optional[X]: the model may also leave it out or send null
            return json_schema(members[0])
        return {"anyOf": [json_schema(a) for a in members]}
    if origin in (list, tuple, set, frozenset):
        out = {"type": "array"}
        if args and args[0] is not Ellipsis:
            out["items"] = json_schema(args[0])
        return out
    if origin is dict:
        out = {"type": "object"}
        if len(args) == 2 and json_schema(args[1]):
            out["additionalProperties"] = json_schema(args[1])
        return out
    return {}


def parse_docstring(doc: str | None) -> tuple[str, dict[str, str]]:
    """(description = first paragraph, {param: description} from a Google-style Args: block)."""
    lines = inspect.cleandoc(doc or "").splitlines()
    first: list[str] = []
    for line in lines:
        if not line.strip():
            break
        first.append(line.strip())
    params: dict[str, str] = {}
    in_args, current, indent = False, None, 0
    for line in lines:
        stripped = line.strip()
        if stripped in ("Args:", "Arguments:", "Parameters:"):
            in_args, current = True, None
            continue
        if not in_args or not stripped:
            continue
        line_indent = len(line) - len(line.lstrip())
        if line_indent == 0:  # the next section ("Returns:") ends the Args block
            in_args = False
            continue
        match = _ARG_LINE.match(stripped)
        if match and (current is None or line_indent <= indent):
            current, indent = match.group(1).lstrip("*"), line_indent
            params[current] = match.group(2).strip()
        elif current is not None:  # a continuation line of the current parameter
            params[current] = f"{params[current]} {stripped}".strip()
    return " ".join(first), params


def type_error(value: Any, hint: Any) -> str | None:
    """Why `value` does not fit `hint` (basic types only), or None when it fits."""
    if hint is inspect.Parameter.empty or hint is Any:
        return None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if _is_union(hint):
        if value is None and type(None) in args:
            return None
        members = [a for a in args if a is not type(None)]
        if len(members) == 1:  # Optional[X]: X's own reason is the most useful
            return type_error(value, members[0])
        if any(type_error(value, a) is None for a in members):
            return None
        return f"expected {_describe(hint)}, got {type(value).__name__}"
    if origin is Literal:
        return None if value in args else f"expected one of {list(args)}, got {value!r}"
    base = origin or hint
    ok = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, int | float) and not isinstance(v, bool),
        str: lambda v: isinstance(v, str),
        list: lambda v: isinstance(v, list),
        tuple: lambda v: isinstance(v, list | tuple),
        dict: lambda v: isinstance(v, dict),
    }.get(base)
    if ok is None:  # a type we do not check: let the function decide
        return None
    if not ok(value):
        return f"expected {_describe(hint)}, got {type(value).__name__}"
    if base is list and args:
        for i, item in enumerate(value):
            why = type_error(item, args[0])
            if why:
                return f"item {i}: {why}"
    return None


def _describe(hint: Any) -> str:
    schema = json_schema(hint)
    if "anyOf" in schema:
        return " or ".join(s.get("type", "any") for s in schema["anyOf"])
    return schema.get("type", str(hint))


def to_text(value: Any) -> str:
    """A str as is; else JSON when it serialises; else `str()`."""
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return str(value)


class FunctionTool(StatelessTool):
    """A Python function the model can call; `call` returns (text, ok)."""

    def __init__(
        self,
        fn: str | Callable[..., Any],
        name: str | None = None,
        max_concurrency: int | None = None,
    ) -> None:
        self.max_concurrency = max_concurrency  # calls at once per worker; None: no limit
        self.fn = resolve_callable(fn)
        self.name = name or getattr(self.fn, "__name__", "function")
        self._signature = inspect.signature(self.fn)
        try:
            self._hints = typing.get_type_hints(self.fn)
        except Exception:  # unresolvable forward references: fall back to the raw annotations
            self._hints = {p.name: p.annotation for p in self._signature.parameters.values()}
        kinds = {p.kind for p in self._signature.parameters.values()}
        self._accepts_extra = inspect.Parameter.VAR_KEYWORD in kinds
        self._params = [
            p
            for p in self._signature.parameters.values()
            if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
            and p.kind is not inspect.Parameter.POSITIONAL_ONLY
        ]
        self._is_async = inspect.iscoroutinefunction(self.fn)
        self._schema = self._build_schema()

    def _build_schema(self) -> dict[str, Any]:
        description, docs = parse_docstring(inspect.getdoc(self.fn))
        properties: dict[str, Any] = {}
        for p in self._params:
            prop = json_schema(self._hints.get(p.name, inspect.Parameter.empty))
            if p.name in docs:
                prop["description"] = docs[p.name]
            if p.default is not inspect.Parameter.empty and _jsonable(p.default):
                prop["default"] = p.default
            properties[p.name] = prop
        required = [p.name for p in self._params if p.default is inspect.Parameter.empty]
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": description,
                "parameters": {"type": "object", "properties": properties, "required": required},
            },
        }

    def schema(self) -> dict[str, Any]:
        return json.loads(json.dumps(self._schema))  # a deep copy callers may change

    def validate(self, arguments: Any) -> str | None:
        """Why the arguments do not fit the signature, or None when they do."""
        if not isinstance(arguments, dict):
            return f"arguments must be an object, got {type(arguments).__name__}"
        names = {p.name for p in self._params}
        unknown = sorted(str(k) for k in arguments if k not in names)
        if unknown and not self._accepts_extra:
            return f"unknown argument(s) {unknown}; expected {sorted(names)}"
        missing = [
            p.name
            for p in self._params
            if p.default is inspect.Parameter.empty and p.name not in arguments
        ]
        if missing:
            return f"missing required argument(s) {missing}"
        for p in self._params:
            if p.name in arguments:
                hint = self._hints.get(p.name, inspect.Parameter.empty)
                why = type_error(arguments[p.name], hint)
                if why:
                    return f'argument "{p.name}": {why}'
        return None

    async def call(self, traj_key: str, arguments: dict[str, Any]) -> tuple[str, bool]:
        why = self.validate(arguments)
        if why:
            return f"Error: {why}", False
        try:
            if self._is_async:
                result = await self.fn(**arguments)
            else:
                result = await asyncio.to_thread(self.fn, **arguments)
        except Exception as e:  # the function's own failure is shown to the model
            return f"Error: {type(e).__name__}: {e}", False
        return to_text(result), True


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True
