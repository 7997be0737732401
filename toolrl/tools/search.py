"""A search tool for the model, over a local BM25 index or a Search-R1-style HTTP server.

`SearchTool` (name "search", one `query` string argument) asks a `Retriever` for the top-k
documents and returns them as numbered "title: text" lines, cut to `max_chars` with a
visible "[truncated]" marker. Retrievers:

- `BM25Retriever(path)`: pure-Python Okapi BM25 over a jsonl corpus (one
  {"id", "title", "text"} object a line; a `.parquet` file also works when `pyarrow` is
  importable). Tokens are lowercase runs of letters and digits. Path rule: a path starting
  with `package:` is relative to the `toolrl` package directory
  (`package:data/corpus/facts.jsonl` is the shipped corpus); any other relative path is
  tried from the cwd first and then from the repository root (the parent of `toolrl/`).
- `HTTPRetriever(url)`: POSTs {"queries": [q], "topk": k, "return_scores": true} to a
  Search-R1 retrieval server and reads {"result": [[{"document": {...}, "score": s}, ...]]}
  (or plain documents). Documents with only "contents" are split Search-R1 style: the
  first line, unquoted, is the title. A connection failure, timeout, HTTP error or
  unreadable answer raises `ToolInfraError`.

The default config is conf/tools/search.yaml. Run `python -m pytest tests/unit/test_search.py`.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

from toolrl.tools.base import StatelessTool, ToolInfraError

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # .../toolrl
TRUNCATION_MARKER = " ... [truncated]"
_TOKEN = re.compile(r"[a-z0-9]+")


@runtime_checkable
class Retriever(Protocol):
    async def search(self, query: str, k: int) -> list[dict[str, Any]]:
        """The k best documents for the query, best first: dicts with "title" and "text"."""
        ...


def tokenize(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def resolve_corpus_path(path: str | Path) -> Path:
    """Apply the path rule of the module docstring; raises FileNotFoundError when nothing fits."""
    text = str(path)
    if text.startswith("package:"):
        candidates = [PACKAGE_DIR / text.removeprefix("package:")]
    else:
        candidates = [Path(text)]
        if not Path(text).is_absolute():
            candidates.append(PACKAGE_DIR.parent / text)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"corpus {text!r} not found (tried {[str(c) for c in candidates]})")


def load_corpus(path: str | Path) -> list[dict[str, Any]]:
    """Read the corpus rows: jsonl, or parquet when pyarrow is importable."""
    resolved = resolve_corpus_path(path)
    if resolved.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise ImportError("reading a parquet corpus needs pyarrow") from e
        return pq.read_table(resolved).to_pylist()
    rows = []
    with resolved.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError(f"{resolved}:{line_no}: expected a JSON object")
                rows.append(row)
    return rows


@dataclass
class BM25Retriever:
    """Okapi BM25 over an in-memory corpus; title and text are indexed together."""

    path: str
    k1: float = 1.5
    b: float = 0.75
    docs: list[dict[str, Any]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.docs = [
            {
                "id": str(row.get("id", i)),
                "title": str(row.get("title", "")),
                "text": str(row.get("text", row.get("contents", ""))),
            }
            for i, row in enumerate(load_corpus(self.path))
        ]
        # Inverted index: term -> [(doc index, term frequency)]; lengths in tokens.
        self._postings: dict[str, list[tuple[int, int]]] = {}
        self._lengths: list[int] = []
        for i, doc in enumerate(self.docs):
            tokens = tokenize(f"{doc['title']} {doc['text']}")
            self._lengths.append(len(tokens))
            for term, tf in Counter(tokens).items():
                self._postings.setdefault(term, []).append((i, tf))
        n = len(self.docs)
        self._avg_len = sum(self._lengths) / n if n else 0.0
        self._idf = {
            term: math.log(1.0 + (n - len(p) + 0.5) / (len(p) + 0.5))
            for term, p in self._postings.items()
        }

    def scores(self, query: str) -> dict[int, float]:
        """BM25 score of every document that shares a term with the query."""
        out: dict[int, float] = {}
        for term in set(tokenize(query)):
            idf = self._idf.get(term)
            if idf is None:
                continue
            for i, tf in self._postings[term]:
                norm = 1.0 - self.b + self.b * self._lengths[i] / self._avg_len
                out[i] = out.get(i, 0.0) + idf * tf * (self.k1 + 1.0) / (tf + self.k1 * norm)
        return out

    async def search(self, query: str, k: int) -> list[dict[str, Any]]:
        ranked = sorted(self.scores(query).items(), key=lambda item: (-item[1], item[0]))
        return [{**self.docs[i], "score": score} for i, score in ranked[: max(k, 0)]]


@dataclass
class HTTPRetriever:
    """Client of a Search-R1-style retrieval server (POST {"queries", "topk"}). A connection
    failure, a timeout, a 429 or a 5xx answer is retried `retries` times, waiting backoff_s,
    then twice that, ...; only then, or once `deadline_s` is spent, is it an infrastructure
    fault (the trajectory leaves the loss). Keep deadline_s below rollout.tool_timeout_s,
    or the loop's timeout cuts the call first and the model reads it as a tool error.
    `attempts_failed` counts the failed attempts so far (retried or not)."""

    url: str
    timeout_s: float = 3.0  # per attempt
    retries: int = 2
    backoff_s: float = 0.5
    deadline_s: float = 8.0  # all attempts and waits together
    attempts_failed: int = field(default=0, init=False, compare=False)

    async def search(self, query: str, k: int) -> list[dict[str, Any]]:
        answer = await asyncio.to_thread(self._post, {"queries": [query], "topk": k})
        try:
            results = answer["result"][0]
            return [_normalise(item) for item in results][:k]
        except (KeyError, IndexError, TypeError, AttributeError) as e:
            raise ToolInfraError(f"retriever at {self.url} answered in an unknown shape") from e

    def _post(self, payload: dict[str, Any]) -> Any:
        payload = {**payload, "return_scores": True}
        request = urllib.request.Request(
            self.url,
            data=json.dumps(payload).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        end = time.monotonic() + self.deadline_s
        for attempt in range(self.retries + 1):
            timeout = min(self.timeout_s, end - time.monotonic())
            try:
                if timeout <= 0:
                    raise TimeoutError(f"no time left of deadline_s={self.deadline_s:g}")
                with urllib.request.urlopen(request, timeout=timeout) as response:
                    return json.loads(response.read().decode("utf-8"))
            except ValueError as e:  # not JSON: asking again will not help
                raise ToolInfraError(f"retriever at {self.url} answered no JSON: {e}") from e
            except (urllib.error.URLError, OSError) as e:  # HTTPError is a URLError
                self.attempts_failed += 1
                client_error = isinstance(e, urllib.error.HTTPError) and e.code not in RETRIED
                wait = self.backoff_s * 2**attempt
                if client_error or attempt == self.retries or time.monotonic() + wait >= end:
                    raise ToolInfraError(
                        f"retriever at {self.url} failed ({attempt + 1} attempts): {e}"
                    ) from e
                time.sleep(wait)
        raise AssertionError("unreachable")


RETRIED = (429, 500, 502, 503, 504)  # HTTP codes worth asking again


def _normalise(item: Mapping[str, Any]) -> dict[str, Any]:
    """One server result -> {"id", "title", "text"[, "score"]}."""
    doc = item.get("document", item)
    out: dict[str, Any] = {"id": str(doc.get("id", ""))}
    if "title" in doc or "text" in doc:
        out["title"], out["text"] = str(doc.get("title", "")), str(doc.get("text", ""))
    else:  # Search-R1 "contents": '"Title"\nbody'
        first, _, rest = str(doc.get("contents", "")).partition("\n")
        out["title"], out["text"] = first.strip().strip('"'), rest.strip()
    if "score" in item:
        out["score"] = item["score"]
    return out


SEARCH_SCHEMA: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "search",
        "description": "Search a knowledge base and return the most relevant passages.",
        "parameters": {
            "type": "object",
            "properties": {"query": {"type": "string", "description": "What to search for."}},
            "required": ["query"],
        },
    },
}


class SearchTool(StatelessTool):
    """The search tool. `call` returns (numbered passages, True) or ("Error: why", False)."""

    name: ClassVar[str] = "search"

    def __init__(
        self,
        retriever: Retriever | Mapping[str, Any],
        top_k: int = 3,
        max_chars: int = 1500,
        max_concurrency: int | None = None,  # searches at once per worker (the server's limit)
    ):
        self.max_concurrency = max_concurrency
        if top_k < 1 or max_chars < len(TRUNCATION_MARKER) + 1:
            raise ValueError(f"top_k must be >= 1 and max_chars > {len(TRUNCATION_MARKER)}")
        if isinstance(retriever, Mapping) or not hasattr(retriever, "search"):
            from hydra.utils import instantiate  # a `_target_` mapping not yet instantiated

            retriever = instantiate(retriever)
        if not isinstance(retriever, Retriever):
            raise TypeError(f"retriever {retriever!r} has no async search(query, k)")
        self.retriever, self.top_k, self.max_chars = retriever, top_k, max_chars

    def schema(self) -> dict[str, Any]:
        return json.loads(json.dumps(SEARCH_SCHEMA))

    async def call(self, traj_key: str, arguments: dict[str, Any]) -> tuple[str, bool]:
        if not isinstance(arguments, dict):
            return 'Error: arguments must be an object {"query": "..."}', False
        unknown = sorted(str(k) for k in arguments if k != "query")
        if unknown:
            return f'Error: unknown argument(s) {unknown}; the only argument is "query"', False
        query = arguments.get("query")
        if not isinstance(query, str) or not query.strip():
            return 'Error: "query" must be a non-empty string', False
        docs = await self.retriever.search(query.strip(), self.top_k)  # ToolInfraError passes up
        return self.format(docs[: self.top_k]), True

    def format(self, docs: list[dict[str, Any]]) -> str:
        """Numbered "title: text" lines, cut to max_chars with a visible marker."""
        if not docs:
            return "No results found."
        lines = []
        for n, doc in enumerate(docs, 1):
            title, text = str(doc.get("title", "")).strip(), str(doc.get("text", "")).strip()
            lines.append(f"{n}. {title}: {text}" if title else f"{n}. {text}")
        out = "\n".join(lines)
        if len(out) > self.max_chars:
            out = out[: self.max_chars - len(TRUNCATION_MARKER)] + TRUNCATION_MARKER
        return out
