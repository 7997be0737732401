"""DatasetTask: reading jsonl/parquet/save_to_disk, column mapping,
the token-budget drop, preflight errors that name file/row/column, and the ArithmeticTask API.

    python -m pytest tests/unit/test_dataset_task.py --durations=5
"""

from __future__ import annotations

import json
import logging
import socket
from dataclasses import fields
from pathlib import Path

import pytest
from datasets import Dataset, DatasetDict

from toolrl.data.arithmetic import ArithmeticTask, Prompt
from toolrl.data.dataset import DatasetPrompt, DatasetTask

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "toolrl" / "data" / "samples"

ROWS = [
    {"question": f"What is {a} * {b}?", "answer": str(a * b), "source": f"s{a}"}
    for a, b in [(12, 3), (40, 5), (7, 9), (11, 11), (25, 4), (13, 6), (8, 8), (30, 2)]
]
CHAT_ROWS = [
    {
        "messages": [{"role": "user", "content": "47 * 83?"}],
        "tools": ["calculator"],
        "call": {"name": "calculator", "arguments": {"expression": "47 * 83"}},
    },
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "sqrt 2?"},
        ],
        "tools": ["python", "calculator"],
        "call": {"name": "python", "arguments": {"code": "print(2 ** 0.5)"}},
    },
    {
        "messages": [{"role": "user", "content": "Who wrote it?"}],
        "tools": None,
        "call": {"name": "search", "arguments": {"query": "author"}},
    },
]


@pytest.fixture(autouse=True)
def _offline_and_cached_here(tmp_path, monkeypatch):
    """Keep datasets' cache ($TOOLRL_CACHE) in the test's folder, and fail a test whose reading
    tries the network: datasets swallows the error of its hub pings, so record and check."""
    monkeypatch.setenv("TOOLRL_CACHE", str(tmp_path / "cache"))
    lookups: list[tuple] = []

    def no_network(*args, **kwargs):
        lookups.append(args)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    yield
    assert lookups == [], f"reading tried the network: {lookups}"


def write(rows: list[dict], path: Path, kind: str = "jsonl") -> str:
    """Write rows as a jsonl, parquet, or save_to_disk fixture (a Dataset or a DatasetDict)."""
    ds = Dataset.from_list(rows)
    if kind == "jsonl":
        ds.to_json(str(path), lines=True)
    elif kind == "parquet":
        ds.to_parquet(str(path))
    elif kind == "disk":
        ds.save_to_disk(str(path))
    elif kind == "disk_dict":
        DatasetDict({"train": ds, "test": ds.select(range(2))}).save_to_disk(str(path))
    return str(path)


def write_text(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def math_task(path: str, **kw) -> DatasetTask:
    kw.setdefault("prompt_column", "question")
    kw.setdefault("answer_column", "answer")
    return DatasetTask(train_files=path, eval_files=path, **kw)


def chat_task(path: str, **kw) -> DatasetTask:
    """Rows with a `messages` column and a `tools` column naming each row's tools."""
    kw.setdefault("messages_column", "messages")
    kw.setdefault("tools_column", "tools")
    return DatasetTask(train_files=path, eval_files=path, **kw)


def view(prompts: list[DatasetPrompt]) -> list[tuple]:
    return [(p.messages, p.answer, p.row, p.tools) for p in prompts]


# ---- readers ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind,name", [("parquet", "d.parquet"), ("disk", "d_disk"), ("disk_dict", "d_dict")]
)
def test_every_reader_gives_the_same_rows(tmp_path, kind, name):
    want = view(math_task(write(ROWS, tmp_path / "d.jsonl")).prompts("train"))
    assert want[0] == (
        [{"role": "user", "content": "What is 12 * 3?"}],
        "36",
        {"question": "What is 12 * 3?", "answer": "36", "source": "s12"},
        None,
    )
    task = math_task(write(ROWS, tmp_path / name, kind))
    assert view(task.prompts("train")) == want
    # A DatasetDict folder: "train" for train, "test" (or eval/validation) for eval.
    assert len(task.prompts("eval")) == (2 if kind == "disk_dict" else len(ROWS))


def test_explicit_format_lists_and_globs(tmp_path):
    odd = write(ROWS[:3], tmp_path / "part.data", "parquet")  # a suffix auto cannot read
    with pytest.raises(ValueError, match="cannot tell the format"):
        math_task(odd)
    assert len(math_task(odd, format="parquet").prompts("train")) == 3
    write(ROWS[:4], tmp_path / "a-0.jsonl")
    write(ROWS[4:], tmp_path / "a-1.jsonl")
    task = DatasetTask(
        train_files=str(tmp_path / "a-*.jsonl"),
        eval_files=[str(tmp_path / "a-1.jsonl")],
        prompt_column="question",
    )
    assert [p.row["question"] for p in task.prompts("train")] == [r["question"] for r in ROWS]
    assert len(task.prompts("eval")) == 4
    assert (tmp_path / "cache" / "datasets").is_dir()  # the cache stays under $TOOLRL_CACHE


# ---- column mapping --------------------------------------------------------------------------


def test_messages_column_tools_subset_and_structured_answer(tmp_path):
    path = write(CHAT_ROWS, tmp_path / "chat.jsonl")
    task = chat_task(path, answer_column="call", system_prompt="Use the tools.")
    p = task.prompts("train")
    assert p[0].messages == [
        {"role": "system", "content": "Use the tools."},
        {"role": "user", "content": "47 * 83?"},
    ]
    assert p[1].messages == CHAT_ROWS[1]["messages"]  # the row's own system prompt wins
    assert [x.tools for x in p] == [["calculator"], ["python", "calculator"], None]
    assert json.loads(p[0].answer) == CHAT_ROWS[0]["call"]
    assert set(p[2].row) == {"messages", "tools", "call"}  # the whole row by default
    assert p[2].row["call"]["arguments"]["query"] == "author"


def test_template_system_prompt_and_reward_columns(tmp_path):
    task = math_task(
        write(ROWS, tmp_path / "d.jsonl"),
        prompt_template="Question ({source}): {question}\nAnswer with a number.",
        system_prompt="You can call a calculator.",
        reward_columns=["answer"],
    )
    p = task.prompts("eval")[2]
    assert p.messages == [
        {"role": "system", "content": "You can call a calculator."},
        {"role": "user", "content": "Question (s7): What is 7 * 9?\nAnswer with a number."},
    ]
    assert p.row == {"answer": "63"}
    assert p.answer == "63"
    # The template alone (no prompt_column) also works; no answer column gives "".
    task = DatasetTask(
        train_files=str(tmp_path / "d.jsonl"),
        eval_files=str(tmp_path / "d.jsonl"),
        prompt_template="{question}",
    )
    assert task.prompts("train")[0].answer == ""
    assert task.prompts("train")[0].messages == [{"role": "user", "content": "What is 12 * 3?"}]


def test_shipped_samples_load():
    math = SAMPLES / "math_sample.jsonl"
    task = math_task(str(math))
    assert len(task.prompts("train")) >= 3 and all(p.answer for p in task.prompts("train"))
    task = chat_task(str(SAMPLES / "function_calling_sample.jsonl"), answer_column="expected_call")
    calls = [json.loads(p.answer) for p in task.prompts("train")]
    assert len(calls) >= 3 and all("name" in c and "arguments" in c for c in calls)
    assert any(p.tools is None for p in task.prompts("train"))


# ---- token budget ----------------------------------------------------------------------------


def test_too_long_prompts_are_dropped_with_a_count(tmp_path, caplog):
    rows = ROWS[:4] + [{"question": "word " * 50, "answer": "0", "source": "x"}] * 2
    path = write(rows, tmp_path / "d.jsonl")

    def words(messages):
        return sum(len(m["content"].split()) for m in messages)

    with caplog.at_level(logging.WARNING, logger="toolrl.data.dataset"):
        task = math_task(path, max_prompt_tokens=10, count_tokens=words)
    assert len(task.prompts("train")) == 4
    assert all(words(p.messages) <= 10 for p in task.prompts("train"))
    assert "train split: dropped 2 of 6" in caplog.text
    assert len(math_task(path, max_prompt_tokens=10).prompts("train")) == 6  # no counter
    with pytest.raises(ValueError, match="all 6 prompts .* longer than max_prompt_tokens=1"):
        math_task(path, max_prompt_tokens=1, count_tokens=words)


# ---- preflight errors ------------------------------------------------------------------------

GOOD = '{"question": "x", "answer": "1", "book": "b", "t": null}\n'
GOOD_CHAT = '{"m": [{"role": "user", "content": "x"}]}\n'
CHAT = {"prompt_column": None, "messages_column": "m", "answer_column": None}

BAD_CASES = {
    # name: (bad file's text, task options, regex the message must match after the file name)
    "not json": (
        '{"question": "a", "answer": "1"}\n{"question": \n',
        {},
        r"cannot be read as json",
    ),
    "empty": ("", {}, r"no rows, so the eval split \(eval_files\) is empty"),
    "missing column": (
        '{"q": "a", "answer": "1"}\n',
        {},
        r"no column 'question' \(named by prompt_column\)",
    ),
    "prompt not a string": (
        '{"question": "a", "answer": "1"}\n{"question": ["b"], "answer": "2"}\n',
        {},
        r"row 1, column 'question'.*must be a string",
    ),
    "template column": (
        '{"question": "a", "answer": "1"}\n',
        {"prompt_template": "{question} from {book}"},
        r"no column 'book' \(named by prompt_template\)",
    ),
    "messages not a list": (
        '{"m": [{"role": "user", "content": "a"}]}\n{"m": "hello"}\n',
        CHAT,
        r"row 1, column 'm'.*list of \{role, content\}",
    ),
    "message without role": (
        '{"m": [{"role": "user", "content": "a"}]}\n{"m": [{"content": "b"}]}\n',
        CHAT,
        r"row 1, column 'm': message 0 must be a dict with a string 'role'",
    ),
    "message without content": (
        '{"m": [{"role": "user", "content": "a"}]}\n{"m": [{"role": "user", "content": 3}]}\n',
        CHAT,
        r"row 1, column 'm': message 0 \(user\) must have a string 'content'",
    ),
    "tools not strings": (
        '{"question": "a", "t": ["calculator"]}\n{"question": "b", "t": [1, 2]}\n',
        {"tools_column": "t", "answer_column": None},
        r"row 1, column 't'.*list of tool names",
    ),
    "tools not a list": (
        '{"question": "a", "t": "calculator"}\n',
        {"tools_column": "t", "answer_column": None},
        r"row 0, column 't'.*list of tool names",
    ),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_preflight_names_file_row_and_column(tmp_path, case):
    text, options, pattern = BAD_CASES[case]
    kw = {"prompt_column": "question", "answer_column": "answer", **options}
    good = write_text(tmp_path / "good.jsonl", GOOD_CHAT if options is CHAT else GOOD)
    bad = write_text(tmp_path / "bad.jsonl", text)
    assert DatasetTask.preflight(train_files=good, eval_files=good, **kw) is None
    with pytest.raises(ValueError, match=f"bad.jsonl.*{pattern}"):
        DatasetTask.preflight(train_files=good, eval_files=bad, **kw)


def test_preflight_config_errors(tmp_path):
    good = write(ROWS, tmp_path / "good.jsonl")
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match=r"train_files: file not found: .*nope\.jsonl"):
        DatasetTask.preflight(train_files=missing, eval_files=good, prompt_column="question")
    with pytest.raises(ValueError, match=r"no path matches .*nope-\*\.jsonl"):
        DatasetTask.preflight(
            train_files=good, eval_files=str(tmp_path / "nope-*.jsonl"), prompt_column="question"
        )
    with pytest.raises(ValueError, match="either messages_column"):
        DatasetTask.preflight(train_files=good, eval_files=good)
    with pytest.raises(ValueError, match="unknown task option"):
        DatasetTask.preflight(train_files=good, eval_files=good, prompt_colum="question")
    with pytest.raises(ValueError, match="format: is 'csv'"):
        DatasetTask.preflight(
            train_files=good, eval_files=good, prompt_column="question", format="csv"
        )


# ---- standing in for ArithmeticTask ----------------------------------------------------------


def test_stands_in_for_arithmetic_task(tmp_path):
    """The trainer reads `task.prompts(split)` and each prompt's `messages` and `answer`."""
    arith = ArithmeticTask(num_train=4, num_eval=2)
    task = math_task(write(ROWS, tmp_path / "d.jsonl"))
    for split in ("train", "eval"):
        for p, ref in zip(task.prompts(split), arith.prompts(split), strict=False):
            assert isinstance(p, Prompt)
            for f in fields(Prompt):
                assert type(getattr(p, f.name)) is type(getattr(ref, f.name))
            assert all(set(m) == {"role", "content"} for m in p.messages)
    assert [p.answer for p in task.prompts("eval")[:3]] == ["36", "200", "63"]  # file order
    with pytest.raises(ValueError, match="split must be"):
        task.prompts("test")


def test_conf_task_dataset_composes_and_builds():
    from hydra import compose, initialize_config_dir

    from toolrl.config import instantiate, register, to_config

    register()
    sample = str(SAMPLES / "math_sample.jsonl")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = to_config(
            compose(
                "config",
                overrides=[
                    "task=dataset",
                    f"task.train_files={sample}",
                    f"task.eval_files={sample}",
                    "task.prompt_column=question",
                    "task.answer_column=answer",
                ],
            )
        )
    kwargs = {k: v for k, v in cfg.task.items() if not k.startswith("_")}
    DatasetTask.preflight(**kwargs)
    assert instantiate(cfg.task).prompts("train")[1].answer == "4500"
