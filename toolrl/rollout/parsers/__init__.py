"""Tool-call parsers and the reasoning step that runs before them.

Per sampled turn the agent loop runs `reasoning(text) -> (reasoning, rest)` and then
`parser(rest) -> ParsedTurn(content, calls, errors)`; calls inside reasoning are counted,
never run. A parser is any callable `text -> ParsedTurn`; one whose constructor takes
`tool_schemas=` gets the run's tool schemas. Each call is parsed on its own: a malformed
call is one error line the model reads (`tool call 2: ...`), its neighbours still run.
Calls past `max_parallel_calls` get an error answer each; a turn is read up to 64 calls
(`base.MAX_CALLS_READ`), and one error says the rest was not read. Nothing is evaluated.
JSON is read strictly: NaN, Infinity and numbers too large for a float are errors.

The rules, one row per format (the module docstrings give the details):

| format | a call is | content is | an error is |
|---|---|---|---|
| `hermes` | `<tool_call>` + one JSON object `{"name", "arguments"}` + `</tool_call>`, read string-aware | text outside blocks | bad JSON, a key twice, wrong shape, text between the object and `</tool_call>`, an unclosed block |
| `qwen3_coder` | `<tool_call><function=N>` + `<parameter=P>V</parameter>`... + `</function></tool_call>`; a value ends at the `</parameter>` before the next `<parameter=` or `</function>`; typed by the schema, strings stay strings | text outside blocks | a parameter twice, a value not of its schema type, stray text, an unclosed block |
| `llama3_json` | JSON objects `{"name", "parameters"}` joined by `;`, from `<|python_tag|>`, from a turn that opens with `{`, or after prose from the first `{"name":` (or `"parameters":`, `"arguments":`) that no earlier `{` encloses | prose before the calls, text after the last object | bad JSON, a key twice, both `parameters` and `arguments`, wrong shape |
| `mistral` | after `[TOOL_CALLS]`: a JSON array of `{"name", "arguments", "id"?}` (or one such object), or `name[CALL_ID]id[ARGS]{...}` back to back, each value read string-aware; a later `[TOOL_CALLS]` opens more | text outside the calls | bad JSON, a key twice, no `name[ARGS]` after the marker, an unclosed array |
| `pythonic` | `[f(k=literal, ...), ...]` at the turn's start, after `<|python_tag|>`, or after prose when the list ends the turn and opens with `name(k=` or `name()` | prose before the list, text after `]` | positional or `**` arguments, a keyword or dict key twice, a non-literal or non-JSON value, an unclosed list |

Reasoning (`parser/reasoning=`): `qwen3` (`<think>...</think>`), `mistral`
(`[THINK]...[/THINK]`), `none`. Only a block that leads the turn (or that the prompt opened)
is reasoning; an unclosed one holds the rest of the turn, so that turn has no calls.

Where toolrl reads a turn differently from vLLM's parsers, and why, is listed and checked in
`tests/unit/test_parsers_vllm.py` (DISAGREEMENTS): markers inside strings are data, a key
given twice is an error rather than the last value, and a pythonic list may follow prose.

    python -m pytest tests/unit/test_parsers.py tests/unit/test_parser_hermes.py \
        tests/unit/test_parser_edges.py tests/unit/test_parsers_vllm.py \
        tests/unit/test_reasoning.py tests/unit/test_parser_roundtrip.py
    python bench/parsers.py      # parse time against argument size, 1 KB to 1 MB
"""
