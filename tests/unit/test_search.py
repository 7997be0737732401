"""Unit tests for the search tool: BM25 ranking, formatting, the HTTP retriever, the YAML config.

Run `python -m pytest tests/unit/test_search.py`.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from tests.net import free_port
from toolrl.tools.base import Tool, ToolInfraError
from toolrl.tools.search import (
    TRUNCATION_MARKER,
    BM25Retriever,
    HTTPRetriever,
    Retriever,
    SearchTool,
    resolve_corpus_path,
)

ROOT = Path(__file__).resolve().parents[2]
CORPUS = "package:data/corpus/facts.jsonl"


@pytest.fixture(scope="module")
def bm25() -> BM25Retriever:
    return BM25Retriever(CORPUS)


def search(retriever: Any, query: str, k: int = 3) -> list[dict[str, Any]]:
    return asyncio.run(retriever.search(query, k))


def test_corpus_is_well_formed(bm25: BM25Retriever) -> None:
    rows = [json.loads(line) for line in (ROOT / "toolrl/data/corpus/facts.jsonl").open()]
    assert 50 <= len(rows) <= 200
    assert all(set(r) == {"id", "title", "text"} and r["title"] and r["text"] for r in rows)
    assert len({r["id"] for r in rows}) == len(rows)
    assert len(bm25.docs) == len(rows)


@pytest.mark.parametrize(
    ("query", "title"),
    [
        ("What is the capital of Australia?", "Canberra"),
        ("Challenger Deep trench", "Mariana Trench"),
        ("who received the telephone patent", "Telephone"),
        ("how many bones in an adult skeleton", "Human skeleton"),
        ("fastest land animal", "Cheetah"),
        ("powerhouse of the cell ATP", "Mitochondria"),
        ("Red Planet moons Phobos", "Mars"),
        ("GOLD chemical symbol Au", "Gold"),
    ],
)
def test_bm25_ranks_the_relevant_doc_first(bm25: BM25Retriever, query: str, title: str) -> None:
    results = search(bm25, query)
    assert results[0]["title"] == title
    scores = [r["score"] for r in results]
    assert scores == sorted(scores, reverse=True)
    assert scores[0] > scores[-1]


def test_parquet_corpus_ranks_the_same_as_its_jsonl(bm25: BM25Retriever, tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    rows = [json.loads(line) for line in (ROOT / "toolrl/data/corpus/facts.jsonl").open()]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "facts.parquet")
    from_parquet = BM25Retriever(str(tmp_path / "facts.parquet"))
    for query in ("powerhouse of the cell ATP", "Red Planet moons Phobos"):
        assert search(from_parquet, query) == search(bm25, query)
        assert search(from_parquet, query)[0]["title"] in ("Mitochondria", "Mars")


def test_bm25_edge_cases(bm25: BM25Retriever, tmp_path: Path) -> None:
    assert search(bm25, "zzzqqq xylophonic") == []
    assert len(search(bm25, "the", k=5)) == 5
    assert search(bm25, "the", k=0) == []
    corpus = tmp_path / "tiny.jsonl"
    rows = [
        {"id": "a", "title": "Cats", "text": "cats purr"},
        {"id": "b", "title": "Dogs", "text": "dogs bark"},
    ]
    corpus.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    tiny = BM25Retriever(str(corpus))
    assert [d["id"] for d in search(tiny, "dogs", k=5)] == ["b"]


def test_path_rule() -> None:
    shipped = ROOT / "toolrl/data/corpus/facts.jsonl"
    assert resolve_corpus_path(CORPUS) == shipped
    assert resolve_corpus_path("toolrl/data/corpus/facts.jsonl").resolve() == shipped
    with pytest.raises(FileNotFoundError):
        resolve_corpus_path("no/such/corpus.jsonl")


def test_search_tool_formats_numbered_lines(bm25: BM25Retriever) -> None:
    tool = SearchTool(bm25, top_k=2)
    assert isinstance(tool, Tool) and isinstance(bm25, Retriever)
    assert tool.name == "search"
    assert tool.schema()["function"]["parameters"]["required"] == ["query"]
    text, ok = asyncio.run(tool.call("t", {"query": "capital of Canada"}))
    assert ok
    lines = text.splitlines()
    assert len(lines) == 2
    assert (
        lines[0]
        == "1. Ottawa: Ottawa is the capital city of Canada, located in the province of Ontario."
    )
    assert lines[1].startswith("2. ")
    assert asyncio.run(tool.call("t", {"query": "zzzqqq"})) == ("No results found.", True)


def test_search_tool_truncates(bm25: BM25Retriever) -> None:
    tool = SearchTool(bm25, top_k=5, max_chars=120)
    text, ok = asyncio.run(tool.call("t", {"query": "planet Sun"}))
    assert ok
    assert len(text) == 120
    assert text.endswith(TRUNCATION_MARKER) and "[truncated]" in text
    full, _ = asyncio.run(SearchTool(bm25, top_k=5).call("t", {"query": "planet Sun"}))
    assert full.startswith(text[: -len(TRUNCATION_MARKER)]) and "[truncated]" not in full


@pytest.mark.parametrize(
    "arguments",
    [{}, {"query": ""}, {"query": "   "}, {"query": 3}, {"query": "x", "k": 2}, "query"],
)
def test_search_tool_bad_arguments(bm25: BM25Retriever, arguments: Any) -> None:
    text, ok = asyncio.run(SearchTool(bm25).call("t", arguments))
    assert not ok and text.startswith("Error: ")


def test_yaml_config_instantiates() -> None:
    cfg = OmegaConf.load(ROOT / "conf/tools/search.yaml")
    tool = instantiate(cfg.search)
    assert isinstance(tool, SearchTool) and isinstance(tool.retriever, BM25Retriever)
    assert tool.top_k == 3 and tool.max_chars == 1500
    text, ok = asyncio.run(tool.call("t", {"query": "Who invented the World Wide Web?"}))
    assert ok and text.startswith("1. World Wide Web: ")
    # A retriever given as a `_target_` mapping (not instantiated by Hydra) works too.
    lazy = SearchTool(dict(OmegaConf.to_container(cfg.search.retriever)))
    assert isinstance(lazy.retriever, BM25Retriever)


class _SearchR1Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 - the http.server name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        docs = [
            {
                "document": {"id": str(i), "contents": f'"Doc {i}"\nabout {body["queries"][0]}'},
                "score": 1.0 / (i + 1),
            }
            for i in range(body["topk"])
        ]
        data = json.dumps({"result": [docs]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:  # keep test output quiet
        return None


@pytest.fixture
def server_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _SearchR1Handler)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/retrieve"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=2)


def test_http_retriever_happy_path(server_url: str) -> None:
    retriever = HTTPRetriever(server_url, timeout_s=2.0)
    results = search(retriever, "tides", k=2)
    assert results == [
        {"id": "0", "title": "Doc 0", "text": "about tides", "score": 1.0},
        {"id": "1", "title": "Doc 1", "text": "about tides", "score": 0.5},
    ]
    text, ok = asyncio.run(SearchTool(retriever, top_k=2).call("t", {"query": "tides"}))
    assert ok and text == "1. Doc 0: about tides\n2. Doc 1: about tides"


class _FlakyHandler(_SearchR1Handler):
    """Answers 503 to the first `fail` requests of the server, then as Search-R1 does."""

    def do_POST(self) -> None:  # noqa: N802
        self.server.seen += 1
        if self.server.seen <= self.server.fail:
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        super().do_POST()


@pytest.mark.parametrize("fail, retries, ok", [(2, 2, True), (3, 2, False), (1, 0, False)])
def test_http_retriever_retries_with_backoff_before_an_infra_fault(fail, retries, ok) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FlakyHandler)
    server.seen, server.fail = 0, fail
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/retrieve"
    retriever = HTTPRetriever(url, timeout_s=2.0, retries=retries, backoff_s=0.01)
    try:
        if ok:  # it failed twice, then answered: the model sees passages, not an error
            assert [r["id"] for r in search(retriever, "tides", k=2)] == ["0", "1"]
        else:
            with pytest.raises(ToolInfraError, match=f"{retries + 1} attempts.*503"):
                search(retriever, "tides")
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=2)
    assert server.seen == min(fail + 1, retries + 1)
    assert retriever.attempts_failed == min(fail, retries + 1)


def test_http_retriever_connection_failure_is_infra_error() -> None:
    port = free_port()  # nothing listens there
    retriever = HTTPRetriever(f"http://127.0.0.1:{port}/retrieve", timeout_s=1.0, backoff_s=0.01)
    with pytest.raises(ToolInfraError):
        search(retriever, "anything")
    with pytest.raises(ToolInfraError):  # the tool lets infrastructure faults through
        asyncio.run(SearchTool(retriever).call("t", {"query": "anything"}))
