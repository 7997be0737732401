"""Async rewards scored by a remote service: an LLM judge, or your own HTTP verifier.

`LLMJudge` renders a prompt from the trajectory and its dataset row, asks any OpenAI-compatible
`/v1/chat/completions` server (vLLM, sglang, OpenAI) and reads a score from the reply with a
regex. `HttpScorer` POSTs the whole `Scored` view as JSON to a URL and reads back a number,
`{"score": x}` or a mapping of named numbers (logged per key). Both are `async` objects, so
`RewardRunner` awaits them in the rollout's event loop and many scorings share the server.

    reward:
      judge:
        _target_: toolrl.rewards.remote.LLMJudge
        timeout_s: 120                        # the runner's limit: keep it above deadline_s
        base_url: http://judge-host:8000/v1
        model: judge                          # vllm serve ... --served-model-name judge
        api_key_env: OPENAI_API_KEY           # the env var's name, never the key itself
        deadline_s: 100
      verifier: {_target_: toolrl.rewards.remote.HttpScorer, url: http://verifier:9000/score}

Whose fault a failure is (see toolrl/rewards/base.py): nothing that goes wrong between us and
the server is the model's, so it never scores 0. Connection refused, an HTTP timeout, 5xx and
429 are retried `retries` times with exponential backoff (jitter; a numeric Retry-After is
honoured), then raise `RewardInfraError`, as does passing `deadline_s` (all attempts
together). A reply that cannot be read as a score (the judge's text has no match, the
verifier sent a string or NaN) is retried the same way, then `RewardInfraError`: a broken
judge must not silently zero the policy. Other 4xx (bad model name, bad key, bad URL) is a
config error: `RewardInfraError` at once. A prompt template naming a column the row lacks is
one too. The judge gives 0.0 without asking when the model gave no final answer.

`deadline_s` must stay below the spec's `timeout_s`: the runner counts its own timeout as
the model's fault (score 0). `RewardStack` refuses a spec where it does not.

One `httpx.AsyncClient` per event loop, made on first use (a client is bound to its loop, and
the runner may be driven by several `asyncio.run`s); none is made at construction, so the
objects build from YAML kwargs and pickle.

    python -m pytest tests/unit/test_remote_reward.py
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import os
import random
import re
import string
from collections.abc import Callable, Mapping
from numbers import Integral, Real
from typing import Any, TypeVar

import httpx

from toolrl.rewards.base import RewardInfraError, Scored

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_TEMPLATE = """You are grading an answer to a question.

Question:
{question}

Reference answer:
{answer}

Answer to grade:
{response}

Is the answer to grade correct and complete, given the reference? Give one line of reasoning,
then a last line of the form "Score: N", N an integer from 0 (wrong) to 10 (fully correct)."""

# The last "Score: 8" (markdown bold, "8/10" and "7.5" allowed); the last, since judges
# often reason before the verdict and may quote the scale ("Score: 0 means ...") on the way.
DEFAULT_SCORE_REGEX = r"(?i)\bscore\s*\**\s*[:=]\s*\**\s*(-?\d+(?:\.\d+)?)"

_SNIPPET = 200  # characters of a bad reply quoted in the error


class _Unusable(ValueError):
    """The server answered 2xx, but not with anything that reads as a score."""


class _RemoteScorer:
    """HTTP plumbing both rewards share: auth, per-loop clients, timeouts, retries."""

    def __init__(
        self,
        *,
        headers: Mapping[str, str] | None,
        api_key_env: str | None,
        request_timeout_s: float,
        deadline_s: float,
        retries: int,
        backoff_s: float,
        max_connections: int,
    ) -> None:
        _require(
            _positive(request_timeout_s),
            f"request_timeout_s must be > 0, not {request_timeout_s!r}",
        )
        _require(_positive(deadline_s), f"deadline_s must be > 0, not {deadline_s!r}")
        _require(
            request_timeout_s <= deadline_s,
            f"request_timeout_s ({request_timeout_s}) must not exceed deadline_s ({deadline_s})",
        )
        _require(_count(retries, 0), f"retries must be an integer >= 0, not {retries!r}")
        _require(
            _finite(backoff_s) and backoff_s >= 0, f"backoff_s must be >= 0, not {backoff_s!r}"
        )
        _require(
            _count(max_connections, 1), f"max_connections must be >= 1, not {max_connections!r}"
        )
        _require(
            api_key_env is None or (isinstance(api_key_env, str) and api_key_env.strip() != ""),
            "api_key_env names an environment variable (or is null)",
        )
        headers = dict(headers or {})
        _require(
            all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items()),
            f"headers must map strings to strings, got {headers!r}",
        )
        self.headers = headers
        self.api_key_env = api_key_env
        self.request_timeout_s = float(request_timeout_s)
        self.deadline_s = float(deadline_s)
        self.retries = int(retries)
        self.backoff_s = float(backoff_s)
        self.max_connections = int(max_connections)
        self._clients: dict[asyncio.AbstractEventLoop, httpx.AsyncClient] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_clients"] = {}  # clients hold sockets and a loop; each process makes its own
        return state

    async def aclose(self) -> None:
        """Close the running loop's client (a later call makes a new one)."""
        client = self._clients.pop(asyncio.get_running_loop(), None)
        if client is not None:
            await client.aclose()

    def _client(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        # Clients of finished loops (an earlier asyncio.run) can be neither used nor awaited
        # closed; dropping them lets their sockets be collected.
        for old in [lp for lp in self._clients if lp.is_closed()]:
            del self._clients[old]
        client = self._clients.get(loop)
        if client is None:
            client = httpx.AsyncClient(
                headers=self._auth_headers(),
                # pool=None: waiting for a free connection is bounded by the attempt's own
                # timeout below, not failed at once when many scorings queue up
                timeout=httpx.Timeout(self.request_timeout_s, pool=None),
                limits=httpx.Limits(
                    max_connections=self.max_connections,
                    max_keepalive_connections=self.max_connections,
                ),
            )
            self._clients[loop] = client
        return client

    def _auth_headers(self) -> dict[str, str]:
        headers = {"content-type": "application/json", **self.headers}
        if self.api_key_env is not None:
            key = os.environ.get(self.api_key_env)
            if not key:  # read here, not at construction: the driver may lack the worker's env
                raise RewardInfraError(f"api_key_env {self.api_key_env!r} is not set")
            headers["authorization"] = f"Bearer {key}"
        return headers

    async def _post(self, url: str, body: Any, parse: Callable[[Any], T]) -> T:
        """POST `body` as JSON and `parse` the JSON reply, retrying what may pass; every
        failure ends as RewardInfraError (see the module docstring)."""
        try:
            payload = json.dumps(jsonable(body), allow_nan=False).encode()
        except (ValueError, RecursionError) as e:  # a self-referencing row: not the model's fault
            raise RewardInfraError(f"{url}: cannot send this row as JSON: {e}") from e
        errors: list[str] = []
        try:
            async with asyncio.timeout(self.deadline_s):
                return await self._attempts(url, payload, parse, errors)
        except TimeoutError as e:
            last = f"; last error: {errors[-1]}" if errors else ""
            raise RewardInfraError(
                f"{url}: no score within deadline_s={self.deadline_s}{last}"
            ) from e

    async def _attempts(
        self, url: str, payload: bytes, parse: Callable[[Any], T], errors: list[str]
    ) -> T:
        client = self._client()
        wait_hint = 0.0
        for attempt in range(self.retries + 1):
            if attempt:
                await asyncio.sleep(self._backoff(attempt, wait_hint))
                log.debug("retrying %s (attempt %d): %s", url, attempt + 1, errors[-1])
            wait_hint = 0.0
            try:
                # httpx's timeouts are per phase (connect, each read); this bounds the whole
                # attempt, so a server trickling bytes cannot hold it forever
                async with asyncio.timeout(self.request_timeout_s):
                    resp = await client.post(url, content=payload)
            except (httpx.HTTPError, TimeoutError) as e:
                what = "timed out" if isinstance(e, TimeoutError | httpx.TimeoutException) else ""
                errors.append(f"{what or type(e).__name__}: {e}".rstrip(": "))
                continue
            code = resp.status_code
            if code == 429 or code >= 500:
                errors.append(f"HTTP {code}: {resp.text[:_SNIPPET]}")
                wait_hint = _retry_after(resp)
                continue
            if not 200 <= code < 300:  # the server refuses this request as configured
                raise RewardInfraError(
                    f"{url}: HTTP {code} (check the reward's config): {resp.text[:_SNIPPET]}"
                )
            try:
                return parse(resp.json())
            except (ValueError, KeyError, IndexError, TypeError) as e:  # JSONDecodeError too
                errors.append(f"unusable reply ({e}): {resp.text[:_SNIPPET]}")
        raise RewardInfraError(
            f"{url}: no score after {self.retries + 1} attempts: " + " | ".join(errors[-3:])
        )

    def _backoff(self, attempt: int, hint: float) -> float:
        # Jitter spreads the retries of many rollouts that failed together.
        delay = self.backoff_s * 2 ** (attempt - 1) * random.uniform(0.5, 1.0)
        return max(delay, hint)


class LLMJudge(_RemoteScorer):
    """Scores the final answer by asking an LLM judge; returns a float (0.0 without an answer).

    The prompt is `prompt_template.format(...)` with `{question}` (the row's `question_key`
    column, else the first user message), `{answer}` (the row's `answer_key` column; lists
    joined with "; "), `{response}` (the model's final text), `{transcript}` (the whole
    conversation with tool calls, as text) and any other row column by name. The score is the
    last match of `score_regex` (one group): its number divided by `scale`, or, with
    `verdicts`, the value of the matched word (case-insensitive). `clamp` keeps it in [0, 1].
    `extra_body` is merged into the request (e.g. seed, chat_template_kwargs).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        prompt_template: str = DEFAULT_TEMPLATE,
        *,
        system_prompt: str | None = None,
        question_key: str = "question",
        answer_key: str = "answer",
        score_regex: str = DEFAULT_SCORE_REGEX,
        verdicts: Mapping[str, float] | None = None,
        scale: float = 10.0,
        clamp: bool = True,
        max_tokens: int = 512,
        temperature: float = 0.0,
        extra_body: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        api_key_env: str | None = None,
        request_timeout_s: float = 8.0,
        deadline_s: float = 9.0,
        retries: int = 2,
        backoff_s: float = 0.5,
        max_connections: int = 64,
    ) -> None:
        super().__init__(
            headers=headers,
            api_key_env=api_key_env,
            request_timeout_s=request_timeout_s,
            deadline_s=deadline_s,
            retries=retries,
            backoff_s=backoff_s,
            max_connections=max_connections,
        )
        self.url = _http_url(base_url, "base_url").rstrip("/") + "/chat/completions"
        _require(isinstance(model, str) and model.strip() != "", "model must be a non-empty name")
        _check_template(prompt_template)
        self.regex = _score_regex(score_regex)
        self.verdicts = _verdicts(verdicts)
        _require(_positive(scale), f"scale must be > 0, not {scale!r}")
        _require(_count(max_tokens, 1), f"max_tokens must be an integer >= 1, not {max_tokens!r}")
        _require(_finite(temperature) and temperature >= 0, f"bad temperature {temperature!r}")
        _require(system_prompt is None or isinstance(system_prompt, str), "system_prompt: a string")
        self.model, self.prompt_template, self.system_prompt = model, prompt_template, system_prompt
        self.question_key, self.answer_key = question_key, answer_key
        self.scale, self.clamp = float(scale), bool(clamp)
        self.max_tokens, self.temperature = int(max_tokens), float(temperature)
        self.extra_body = dict(extra_body or {})

    async def __call__(self, x: Scored) -> float:
        if x.final_text is None:
            return 0.0  # no answer, nothing to judge: the model's own fault, no request
        messages = [{"role": "user", "content": self.render(x)}]
        if self.system_prompt:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        body = {
            "model": self.model,
            "messages": messages,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            **self.extra_body,
        }
        return await self._post(self.url, body, self._read_reply)

    def render(self, x: Scored) -> str:
        """The judge's prompt for `x`; RewardInfraError when the template names a missing column."""
        fields: dict[str, Any] = {str(k): v for k, v in x.row.items()}
        question = x.row.get(self.question_key, _first_user_text(x.messages))
        if question is not None:
            fields["question"] = question
        if self.answer_key in x.row:
            fields["answer"] = _as_text(x.row[self.answer_key])
        fields["response"] = x.final_text
        fields["transcript"] = transcript(x.messages)
        try:
            return self.prompt_template.format_map(fields)
        except KeyError as e:  # every row would fail the same way: the config's fault
            raise RewardInfraError(
                f"prompt_template names {{{e.args[0]}}}, which this row lacks "
                f"(columns: {sorted(map(str, x.row))})"
            ) from e
        except (ValueError, IndexError, AttributeError, TypeError) as e:
            raise RewardInfraError(f"prompt_template does not render this row: {e}") from e

    def score(self, text: str) -> float:
        """The score in the judge's reply `text`; ValueError when there is none."""
        matches = list(self.regex.finditer(text))
        found = matches[-1].group(1) if matches else None
        if found is None:
            raise _Unusable(f"score_regex finds no score in {text[-_SNIPPET:]!r}")
        if self.verdicts is not None:
            value = self.verdicts.get(found.strip().lower())
            if value is None:
                raise _Unusable(f"verdict {found!r} is not one of {sorted(self.verdicts)}")
        else:
            try:
                value = float(found) / self.scale
            except ValueError as e:
                raise _Unusable(f"{found!r} is not a number") from e
        if not math.isfinite(value):
            raise _Unusable(f"score {found!r} is not finite")
        return min(max(value, 0.0), 1.0) if self.clamp else value

    def _read_reply(self, data: Any) -> float:
        content = data["choices"][0]["message"]["content"]
        if not isinstance(content, str):  # e.g. a reasoning model that spent max_tokens thinking
            raise _Unusable(f"the reply has no text content: {content!r}")
        return self.score(content)


class HttpScorer(_RemoteScorer):
    """POSTs the trajectory to `url` and returns the service's score.

    The body is every field of `x` (messages, final_text, row, finish_reasons,
    tool_errors, tool_calls, ...) merged with `extra_body`; values JSON cannot carry become
    strings, NaN/inf become null, numpy values become numbers and lists. The reply is a
    number (returned as a float), a mapping holding `score_key` (that value, other keys
    ignored) or a mapping of named numbers (returned as a dict, logged per key). It is sent
    even without a final answer (`final_text: null`): the service may score tool use.
    """

    def __init__(
        self,
        url: str,
        *,
        score_key: str | None = "score",
        extra_body: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        api_key_env: str | None = None,
        request_timeout_s: float = 8.0,
        deadline_s: float = 9.0,
        retries: int = 2,
        backoff_s: float = 0.5,
        max_connections: int = 64,
    ) -> None:
        super().__init__(
            headers=headers,
            api_key_env=api_key_env,
            request_timeout_s=request_timeout_s,
            deadline_s=deadline_s,
            retries=retries,
            backoff_s=backoff_s,
            max_connections=max_connections,
        )
        self.url = _http_url(url, "url")
        self.score_key = score_key
        self.extra_body = dict(extra_body or {})

    async def __call__(self, x: Scored) -> float | dict[str, float]:
        # fields by hand, not dataclasses.asdict: its deepcopy fails on rows holding e.g. locks
        fields = {f.name: getattr(x, f.name) for f in dataclasses.fields(x)}
        body = {**fields, **self.extra_body}
        return await self._post(self.url, body, self.read_reply)

    def read_reply(self, data: Any) -> float | dict[str, float]:
        """The score in the service's JSON reply; ValueError when it holds none."""
        if isinstance(data, Mapping):
            if self.score_key is not None and self.score_key in data:
                return _number(self.score_key, data[self.score_key])
            if not data:
                raise _Unusable("an empty mapping")
            return {str(k): _number(str(k), v) for k, v in data.items()}
        return _number("reply", data)


# --- helpers --------------------------------------------------------------------------------


def jsonable(obj: Any) -> Any:
    """`obj` as plain JSON values: numpy scalars and arrays become numbers and lists, NaN and
    inf become None (strict JSON has neither), anything else unknown becomes its str()."""
    if obj is None or isinstance(obj, str | bool):
        return obj
    if isinstance(obj, Integral):
        return int(obj)
    if isinstance(obj, Real):
        return float(obj) if math.isfinite(float(obj)) else None
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    tolist = getattr(obj, "tolist", None)  # numpy arrays (parquet list columns)
    if callable(tolist):
        try:
            return jsonable(tolist())
        except Exception:  # a tolist() that is not numpy's: fall back to str
            pass
    return str(obj)


def transcript(messages: list[dict[str, Any]]) -> str:
    """The conversation as plain text for a judge: one block per message, calls spelled out."""
    lines = []
    for m in messages:
        role = m.get("role", "?")
        if role == "tool" and m.get("name"):
            role = f"tool ({m['name']})"
        lines.append(f"{role}: {_as_text(m.get('content') or '')}")
        for call in m.get("tool_calls") or ():
            fn = call.get("function", {})
            lines.append(f"  call {fn.get('name')}({fn.get('arguments', '')})")
    return "\n".join(lines)


def _first_user_text(messages: list[dict[str, Any]]) -> str | None:
    for m in messages:
        if m.get("role") == "user":
            return _as_text(m.get("content") or "")
    return None


def _as_text(value: Any) -> Any:
    # Reference answers are often lists (Search-R1's golden_answers, numpy arrays from parquet);
    # content may be OpenAI's list of parts. Anything else is left to str.format.
    if hasattr(value, "tolist") and not isinstance(value, str):
        value = value.tolist()
    if isinstance(value, list | tuple):
        parts = [p.get("text", "") if isinstance(p, Mapping) else str(p) for p in value]
        return "; ".join(parts)
    return value


def _number(key: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, Real) or not math.isfinite(float(v)):
        raise _Unusable(f"{key}: {v!r} is not a finite number")
    return float(v)


def _retry_after(resp: httpx.Response) -> float:
    try:
        return max(0.0, float(resp.headers.get("retry-after", 0)))
    except ValueError:  # the HTTP-date form: fall back to our own backoff
        return 0.0


def _http_url(url: Any, key: str) -> str:
    ok = isinstance(url, str) and re.match(r"https?://[^/\s]+", url.strip()) is not None
    _require(ok, f"{key} must be an http(s) URL, not {url!r}")
    return url.strip()


def _check_template(template: Any) -> None:
    _require(isinstance(template, str) and template != "", "prompt_template must be a string")
    try:
        names = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as e:
        raise ValueError(f"prompt_template is not a format string: {e}") from e
    roots = {re.split(r"[.\[]", n, maxsplit=1)[0] for n in names}
    _require("" not in roots, "prompt_template: name every field ({response}, not {})")
    _require("response" in roots, "prompt_template must contain {response}: the judged answer")


def _score_regex(pattern: Any) -> re.Pattern[str]:
    try:
        regex = re.compile(pattern)
    except (re.error, TypeError) as e:
        raise ValueError(f"bad score_regex {pattern!r}: {e}") from e
    _require(regex.groups >= 1, f"score_regex {pattern!r} needs a group around the score")
    return regex


def _verdicts(verdicts: Mapping[str, float] | None) -> dict[str, float] | None:
    if verdicts is None:
        return None
    _require(isinstance(verdicts, Mapping) and len(verdicts) > 0, "verdicts: a non-empty mapping")
    _require(
        all(_finite(v) for v in verdicts.values()), f"verdict values must be numbers: {verdicts}"
    )
    return {str(k).strip().lower(): float(v) for k, v in verdicts.items()}


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _finite(v: Any) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(float(v))


def _positive(v: Any) -> bool:
    return _finite(v) and v > 0


def _count(v: Any, least: int) -> bool:
    return isinstance(v, Integral) and not isinstance(v, bool) and v >= least
