"""A task read from data files: prompts, reference answers and per-row tools, configured in YAML.

A researcher points `conf/task/dataset.yaml` at jsonl, parquet or `save_to_disk` folders and
maps columns onto a prompt; the files are read with Hugging Face `datasets` (local files only,
its cache kept under `${TOOLRL_CACHE:-~/.cache/toolrl}/datasets`). `prompts(split)` returns the
same kind of prompts as `ArithmeticTask`, plus `.row` (the columns the reward sees) and
`.tools` (the tool names the row offers, None for all). The trainer draws train prompts in a
seeded, resumable order (toolrl/data/order.py), as for any task.
`DatasetTask.preflight(**kwargs)` checks the files before Ray starts.

    python -m toolrl.main task=dataset task.train_files=toolrl/data/samples/math_sample.jsonl \\
        task.eval_files=toolrl/data/samples/math_sample.jsonl \\
        task.prompt_column=question task.answer_column=answer

    task = DatasetTask(train_files="train.jsonl", eval_files="eval.jsonl",
                       prompt_column="question", answer_column="answer")
    task.prompts("train")[0].messages

    python -m pytest tests/unit/test_dataset_task.py
"""

from __future__ import annotations

import glob
import json
import logging
import os
import string
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from toolrl.data.arithmetic import Prompt

log = logging.getLogger(__name__)

FORMATS = ("auto", "jsonl", "json", "parquet", "disk")
SPLITS = ("train", "eval")
# A save_to_disk folder holding a DatasetDict: which of its splits each task split may use.
_DISK_SPLIT_NAMES = {"train": ("train",), "eval": ("eval", "validation", "test")}

CountTokens = Callable[[list[dict[str, Any]]], int]


@dataclass
class DatasetConfig:
    """Where the rows are and how their columns become a prompt (see conf/task/dataset.yaml)."""

    train_files: str | list[str] = ""
    eval_files: str | list[str] = ""
    format: str = "auto"  # auto | jsonl | parquet | disk; auto goes by the file's suffix
    messages_column: str | None = None  # a column holding a list of {role, content} messages
    prompt_column: str | None = None  # or a text column, put through prompt_template
    prompt_template: str | None = None  # "Question: {question}"; `{column}` placeholders
    system_prompt: str | None = None  # prepended unless the row's messages start with one
    answer_column: str | None = None  # the reference answer; "" when unset or null
    tools_column: str | None = None  # per row, a list of tool names (null: all tools)
    reward_columns: list[str] | None = None  # the columns in `.row`; None: the whole row
    max_prompt_tokens: int | None = None  # longer prompts are dropped at load (needs count_tokens)


@dataclass
class DatasetPrompt(Prompt):
    """A prompt from a data row: `messages`, `answer`, `row` and `tools` as ArithmeticTask's."""


@dataclass(frozen=True)
class _Source:
    """One row's origin, so an error can name the file and the row."""

    path: str
    index: int

    def where(self, column: str | None = None) -> str:
        col = f", column {column!r}" if column else ""
        return f"{self.path}: row {self.index}{col}"


def cache_dir() -> Path:
    """datasets' cache for toolrl: inside toolrl's cache, not the user's HF cache."""
    root = os.environ.get("TOOLRL_CACHE") or Path.home() / ".cache" / "toolrl"
    return Path(root) / "datasets"


@contextmanager
def _offline_datasets() -> Iterator[Any]:
    """`datasets`, set offline while toolrl reads with it. Its offline switch is read from the
    environment when it is first imported, possibly by other code, and even a local json file
    otherwise costs a hub request (a download counter, a 3 s wait without network); toolrl
    reads local files only, so a missing one must fail here, never become a hub lookup."""
    import datasets

    conf = datasets.config
    saved = conf.HF_HUB_OFFLINE, conf.HF_DATASETS_OFFLINE, conf.HF_UPDATE_DOWNLOAD_COUNTS
    conf.HF_HUB_OFFLINE = conf.HF_DATASETS_OFFLINE = True
    conf.HF_UPDATE_DOWNLOAD_COUNTS = False
    try:
        yield datasets
    finally:
        conf.HF_HUB_OFFLINE, conf.HF_DATASETS_OFFLINE, conf.HF_UPDATE_DOWNLOAD_COUNTS = saved


PACKAGE_DIR = Path(__file__).resolve().parents[1]


def _as_list(files: str | Sequence[str] | None) -> list[str]:
    if files is None or files == "":
        return []
    if isinstance(files, str | os.PathLike):
        return [str(files)]
    return [str(f) for f in files]


def _expand(files: list[str], key: str) -> list[str]:
    """Paths and glob patterns to existing paths, in a fixed order. A path that starts with
    `package:` is relative to the toolrl package (`package:data/samples/math_sample.jsonl`)."""
    if not files:
        raise ValueError(f"{key}: no files given")
    out: list[str] = []
    for pattern in files:
        if pattern.startswith("package:"):
            pattern = str(PACKAGE_DIR / pattern.removeprefix("package:"))
        if glob.has_magic(pattern):
            matched = sorted(glob.glob(pattern))
            if not matched:
                raise ValueError(f"{key}: file not found: no path matches {pattern!r}")
            out.extend(matched)
        elif not os.path.exists(pattern):
            raise ValueError(f"{key}: file not found: {pattern}")
        else:
            out.append(pattern)
    return out


def _format_of(path: str, fmt: str) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"format: is {fmt!r}; use one of {', '.join(FORMATS)}")
    if fmt != "auto":
        return "json" if fmt == "jsonl" else fmt
    if os.path.isdir(path):
        return "disk"
    name = path.lower()
    if name.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz")):
        return "json"
    if name.endswith(".parquet"):
        return "parquet"
    raise ValueError(
        f"{path}: cannot tell the format from the name; set format (jsonl|parquet|disk)"
    )


def read_file(path: str, fmt: str, split: str) -> Any:
    """One file (or save_to_disk folder) as a `datasets.Dataset`; ValueError names the file."""
    kind = _format_of(path, fmt)
    with _offline_datasets() as ds:
        return _pick_split(_read(ds, path, kind), path, split, ds.DatasetDict)


def _read(ds: Any, path: str, kind: str) -> Any:
    try:
        if kind == "disk":
            data = ds.load_from_disk(path, keep_in_memory=True)
        else:
            data = ds.load_dataset(
                kind,
                data_files=[path],
                split="train",  # datasets' name for "all rows of these files"
                cache_dir=str(cache_dir()),
                keep_in_memory=True,
            )
    except StopIteration:  # the json builder's answer to an empty file
        return []
    except Exception as e:  # datasets wraps the reader's error; the cause says what is wrong
        reason = e.__cause__ or e
        raise ValueError(f"{path}: cannot be read as {kind}: {reason}") from e
    return data


def _pick_split(data: Any, path: str, split: str, dataset_dict: type) -> Any:
    """A save_to_disk DatasetDict's split for the task's split: the one split it holds, or
    the one named like it."""
    if isinstance(data, dataset_dict):
        names = [n for n in _DISK_SPLIT_NAMES[split] if n in data]
        if len(data) != 1 and not names:
            raise ValueError(
                f"{path}: holds splits {sorted(data)}; none is named "
                f"{' or '.join(_DISK_SPLIT_NAMES[split])} for the {split} split"
            )
        data = data[names[0]] if names else next(iter(data.values()))
    return data


def template_columns(template: str) -> list[str]:
    """The columns a prompt template names: "Q: {question} ({source})" -> [question, source]."""
    names = []
    for _, name, _, _ in string.Formatter().parse(template):
        if name is None:
            continue
        if name == "" or name.isdigit():
            raise ValueError(
                f"prompt_template: {template!r} has a positional placeholder; name a column, "
                "e.g. {question}"
            )
        # "{meta[source]}" and "{meta.source}" index into the column `meta`.
        names.append(name.split(".")[0].split("[")[0])
    return names


class DatasetTask:
    """Train/eval prompts read from data files, with their rows and tool subsets.

    Accepts a config or its fields as keywords, so YAML can say
    `task: {_target_: toolrl.data.dataset.DatasetTask, train_files: ..., eval_files: ...}`.
    The run passes two values of its own: `count_tokens(messages) -> int` measures a prompt
    for `max_prompt_tokens` (without it, nothing is dropped), and `tool_names`, the tools the
    run configures, which every row's tool list must come from (without it, not checked).
    """

    def __init__(
        self,
        cfg: DatasetConfig | None = None,
        count_tokens: CountTokens | None = None,
        tool_names: Sequence[str] | None = None,
        **overrides: Any,
    ) -> None:
        cfg = cfg or DatasetConfig()
        known = {f.name for f in fields(DatasetConfig)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown task option(s) {unknown}; known: {sorted(known)}")
        if overrides.get("reward_columns") is not None:
            overrides["reward_columns"] = [str(c) for c in overrides["reward_columns"]]
        self.cfg = replace(cfg, **overrides)
        self.count_tokens = count_tokens
        self.tool_names = None if tool_names is None else list(tool_names)
        self._check_config()
        self._prompts = {split: self._load(split) for split in SPLITS}

    @classmethod
    def preflight(cls, **kwargs: Any) -> None:
        """Load and check every file and row as the constructor would, before Ray starts;
        raises ValueError naming the file, the row and the column."""
        cls(**kwargs)

    # ---- loading -------------------------------------------------------------------------

    def _check_config(self) -> None:
        c = self.cfg
        if (c.messages_column is None) == (c.prompt_column is None and c.prompt_template is None):
            raise ValueError(
                "set either messages_column (a list of chat messages per row) or "
                "prompt_column / prompt_template (a text prompt), not both or neither"
            )
        if c.max_prompt_tokens is not None and c.max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens: must be >= 1, got {c.max_prompt_tokens}")
        if c.max_prompt_tokens is not None and self.count_tokens is None:
            log.warning("max_prompt_tokens is set but no count_tokens was given: nothing dropped")
        if c.format not in FORMATS:
            raise ValueError(f"format: is {c.format!r}; use one of {', '.join(FORMATS)}")

    def _columns_needed(self) -> dict[str, str]:
        """Each column the config names, with the option that names it (for the error)."""
        c = self.cfg
        need = {}
        for option in ("messages_column", "prompt_column", "answer_column", "tools_column"):
            if getattr(c, option) is not None:
                need[getattr(c, option)] = option
        for col in template_columns(c.prompt_template or ""):
            need.setdefault(col, "prompt_template")
        for col in c.reward_columns or []:
            need.setdefault(col, "reward_columns")
        return need

    def _load(self, split: str) -> list[DatasetPrompt]:
        key = f"{split}_files"
        paths = _expand(_as_list(getattr(self.cfg, key)), key)
        need = self._columns_needed()
        prompts: list[DatasetPrompt] = []
        dropped = total = 0
        for path in paths:
            data = read_file(path, self.cfg.format, split)
            columns = list(getattr(data, "column_names", []) or [])
            if len(data):
                for col, option in need.items():
                    if col not in columns:
                        raise ValueError(
                            f"{path}: no column {col!r} (named by {option}); "
                            f"its columns are {columns}"
                        )
            for i, row in enumerate(data):
                total += 1
                prompt = self._make_prompt(row, _Source(path, i))
                if self._too_long(prompt):
                    dropped += 1
                else:
                    prompts.append(prompt)
        if total == 0:
            raise ValueError(f"{', '.join(paths)}: no rows, so the {split} split ({key}) is empty")
        if dropped:
            log.warning(
                "%s split: dropped %d of %d prompts longer than max_prompt_tokens=%d",
                split,
                dropped,
                total,
                self.cfg.max_prompt_tokens,
            )
        if not prompts:
            raise ValueError(
                f"{key}: all {total} prompts of the {split} split are longer than "
                f"max_prompt_tokens={self.cfg.max_prompt_tokens}"
            )
        log.info("%s split: %d prompts from %d file(s)", split, len(prompts), len(paths))
        return prompts

    def _too_long(self, prompt: DatasetPrompt) -> bool:
        limit = self.cfg.max_prompt_tokens
        if limit is None or self.count_tokens is None:
            return False
        return self.count_tokens(prompt.messages) > limit

    def _make_prompt(self, row: dict[str, Any], src: _Source) -> DatasetPrompt:
        c = self.cfg
        if c.messages_column is not None:
            messages = _messages(row[c.messages_column], src, c.messages_column)
        else:
            messages = [{"role": "user", "content": self._render(row, src)}]
        if c.system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": c.system_prompt}, *messages]
        answer = "" if c.answer_column is None else _answer(row[c.answer_column])
        tools = None if c.tools_column is None else _tools(row[c.tools_column], src, c.tools_column)
        configured = set(tools or ()) if self.tool_names is None else set(self.tool_names)
        unknown = sorted(set(tools or ()) - configured)  # not checked without tool_names
        if unknown:
            raise ValueError(
                f"{src.where(c.tools_column)}: names tool(s) {unknown} that the run does not "
                f"configure (tools: {', '.join(self.tool_names or [])}); add them with "
                f"tools=[...] or fix the row"
            )
        seen = row if c.reward_columns is None else {k: row[k] for k in c.reward_columns}
        return DatasetPrompt(messages=messages, answer=answer, row=dict(seen), tools=tools)

    def _render(self, row: dict[str, Any], src: _Source) -> str:
        c = self.cfg
        if c.prompt_column is not None and not isinstance(row[c.prompt_column], str):
            raise ValueError(
                f"{src.where(c.prompt_column)}: the prompt must be a string, got "
                f"{type(row[c.prompt_column]).__name__} {row[c.prompt_column]!r:.80}"
            )
        if c.prompt_template is None:
            return row[c.prompt_column]
        try:
            return c.prompt_template.format_map(row)
        except (KeyError, IndexError, AttributeError, TypeError, ValueError) as e:
            raise ValueError(
                f"{src.where()}: prompt_template {c.prompt_template!r} cannot be filled: {e!r}"
            ) from e

    # ---- the task API --------------------------------------------------------------------

    def prompts(self, split: str) -> list[DatasetPrompt]:
        """All prompts of a split ("train" or "eval"), in file order; fixed for a config."""
        if split not in self._prompts:
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        return self._prompts[split]


def _messages(value: Any, src: _Source, column: str) -> list[dict[str, Any]]:
    """A row's chat messages, checked: a non-empty list of {role: str, content: str} dicts."""
    if not isinstance(value, list) or not value:
        raise ValueError(
            f"{src.where(column)}: must be a non-empty list of {{role, content}} messages, "
            f"got {type(value).__name__} {value!r:.80}"
        )
    out = []
    for j, msg in enumerate(value):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
            raise ValueError(
                f"{src.where(column)}: message {j} must be a dict with a string 'role', "
                f"got {msg!r:.80}"
            )
        content = msg.get("content")
        # An assistant turn that only calls tools may have no text.
        if not isinstance(content, str) and not (content is None and msg.get("tool_calls")):
            raise ValueError(
                f"{src.where(column)}: message {j} ({msg['role']}) must have a string "
                f"'content', got {content!r:.80}"
            )
        # Arrow gives every message the union of all messages' keys, the missing ones null:
        # drop them so a chat template does not see e.g. `tool_calls: None` on a user turn.
        out.append({k: v for k, v in msg.items() if v is not None or k == "content"})
    return out


def _answer(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    # A structured answer (an expected call, a list) as JSON, which a reward can parse back.
    return json.dumps(_drop_nulls(value), ensure_ascii=False)


def _drop_nulls(value: Any) -> Any:
    """Remove null dict entries, recursively. A struct column holds the union of every row's
    keys, the missing ones null: {"expression": "2*3"} in one row and {"code": ...} in another
    read back as {"expression": "2*3", "code": None}, which no expected call meant."""
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def _tools(value: Any, src: _Source, column: str) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        raise ValueError(
            f"{src.where(column)}: must be a list of tool names (strings) or null, "
            f"got {value!r:.80}"
        )
    return list(value)
