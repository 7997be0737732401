"""Remote rewards (toolrl/rewards/remote.py) against a real local HTTP server, no mocks.

One stdlib ThreadingHTTPServer serves the module: `/v1/chat/completions` answers as a judge
steered by a `MODE=...` word inside the judged response, `/score` answers with the row's
`reply` (and `status`). Time limits are a few tenths of a second, so failures stay quick.

    python -m pytest tests/unit/test_remote_reward.py --durations=5
"""

from __future__ import annotations

import asyncio
import datetime
import json
import pickle
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from omegaconf import OmegaConf

from tests.net import free_port
from toolrl.rewards.base import RewardInfraError, Scored
from toolrl.rewards.combine import RewardStack
from toolrl.rewards.remote import HttpScorer, LLMJudge, jsonable
from toolrl.rewards.runner import RewardRunner

CONF = Path(__file__).resolve().parents[2] / "conf" / "reward"
FAST = {"request_timeout_s": 0.2, "deadline_s": 2.0, "retries": 2, "backoff_s": 0.01}


# --- the server -----------------------------------------------------------------------------


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64  # the default listen backlog of 5 drops a burst of 16 connections

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.seen: list[dict[str, Any]] = []
        self.hits: Counter[str] = Counter()
        self.lock = threading.Lock()

    def judge(self, body: dict[str, Any]) -> tuple[int, Any, float]:
        """(status, JSON reply, seconds to wait first), steered by MODE=<word> in the prompt."""
        mode = re.search(r"MODE=(\S+)", body["messages"][-1]["content"]).group(1)
        with self.lock:
            self.hits[mode] += 1
            n = self.hits[mode]
        text, status, delay = "Matches the reference.\nScore: 8", 200, 0.0
        if mode.startswith("flaky") and n == 1:
            status = 500
        elif mode.startswith("limited") and n == 1:
            status = 429
        elif mode == "down":
            status = 503
        elif mode == "refused":
            status = 404
        elif mode == "slow":
            delay = 1.0
        elif mode == "busy":
            delay = 0.3
        elif mode == "nonsense":
            text = "I would rather talk about turtles."
        elif mode == "verdict":
            text = "Reasoning...\n**Verdict:** Correct"
        elif mode == "bold":
            text = "score: 2 is for wrong answers. This one is right.\n**Score:** 9.5/10"
        reply = {"choices": [{"message": {"role": "assistant", "content": text}}]}
        return status, reply if status == 200 else {"error": mode}, delay

    def scorer(self, body: dict[str, Any]) -> tuple[int, Any, float]:
        row = body["row"]
        return row.get("status", 200), row.get("reply", 1.0), row.get("delay", 0.0)


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, *args: Any) -> None:  # keep pytest's output clean
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        self.server.seen.append({"path": self.path, "body": body, "headers": dict(self.headers)})
        route = self.server.judge if self.path == "/v1/chat/completions" else self.server.scorer
        status, reply, delay = route(body)
        time.sleep(delay)
        data = reply.encode() if isinstance(reply, str) else json.dumps(reply).encode()
        try:
            self.send_response(status)
            if status == 429:
                self.send_header("Retry-After", "0")
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout tests)
            pass


@pytest.fixture(scope="module")
def server():
    srv = _Server()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def srv(server):
    server.seen.clear()
    server.hits.clear()
    return server


def base_url(srv: _Server) -> str:
    return f"http://127.0.0.1:{srv.server_address[1]}/v1"


def judge(srv: _Server, **kw: Any) -> LLMJudge:
    return LLMJudge(**{"base_url": base_url(srv), "model": "judge-7b", **FAST, **kw})


def scorer(srv: _Server, **kw: Any) -> HttpScorer:
    return HttpScorer(**{"url": f"http://127.0.0.1:{srv.server_address[1]}/score", **FAST, **kw})


def x(mode: str | None = "score8", **row: Any) -> Scored:
    final = None if mode is None else f"It is 42. MODE={mode}"
    row = {"question": "What is 6 * 7?", "answer": "42", **row}
    messages = [{"role": "user", "content": "What is 6 * 7?"}]
    return Scored(
        messages=messages + [{"role": "assistant", "content": final or ""}],
        final_text=final,
        row=row,
    )


def run(reward: Any, item: Scored) -> Any:
    return asyncio.run(reward(item))


# --- the judge ------------------------------------------------------------------------------


def test_judge_scores_and_sends_the_rendered_prompt(srv):
    assert run(judge(srv, temperature=0.0, max_tokens=64), x("score8")) == pytest.approx(0.8)
    (req,) = srv.seen
    body = req["body"]
    assert req["path"] == "/v1/chat/completions"
    assert (body["model"], body["temperature"], body["max_tokens"]) == ("judge-7b", 0.0, 64)
    (msg,) = body["messages"]
    assert msg["role"] == "user"
    assert "Question:\nWhat is 6 * 7?" in msg["content"]
    assert "Reference answer:\n42" in msg["content"]
    assert "Answer to grade:\nIt is 42. MODE=score8" in msg["content"]
    assert "authorization" not in {k.lower() for k in req["headers"]}


def test_judge_template_system_prompt_columns_and_extra_body(srv):
    template = "Q={question} A={answer} level={level}\n{transcript}\nR={response}"
    j = judge(srv, prompt_template=template, system_prompt="Be strict.", extra_body={"seed": 3})
    item = x("score8", answer=np.array(["42", "forty-two"]), level=3)
    assert run(j, item) == pytest.approx(0.8)
    body = srv.seen[0]["body"]
    assert body["seed"] == 3
    assert body["messages"][0] == {"role": "system", "content": "Be strict."}
    assert body["messages"][1]["content"] == (
        "Q=What is 6 * 7? A=42; forty-two level=3\n"
        "user: What is 6 * 7?\nassistant: It is 42. MODE=score8\nR=It is 42. MODE=score8"
    )


def test_judge_sends_the_api_key_from_the_named_env_var(srv, monkeypatch):
    monkeypatch.setenv("TOOLRL_TEST_JUDGE_KEY", "sk-test-123")
    j = judge(srv, api_key_env="TOOLRL_TEST_JUDGE_KEY", headers={"X-Team": "rl"})
    assert "sk-test-123" not in repr(vars(j))  # the key lives in the client only
    assert run(j, x()) == pytest.approx(0.8)
    headers = {k.lower(): v for k, v in srv.seen[0]["headers"].items()}
    assert headers["authorization"] == "Bearer sk-test-123" and headers["x-team"] == "rl"
    monkeypatch.delenv("TOOLRL_TEST_JUDGE_KEY")
    with pytest.raises(RewardInfraError, match="TOOLRL_TEST_JUDGE_KEY"):
        run(judge(srv, api_key_env="TOOLRL_TEST_JUDGE_KEY"), x())


def test_no_final_answer_scores_zero_without_a_request(srv):
    assert run(judge(srv), x(None)) == 0.0
    assert srv.seen == []


def test_score_forms_last_match_bold_and_verdicts(srv):
    # the last "score" wins over one quoted while reasoning; markdown and "/10" are fine
    assert run(judge(srv), x("bold")) == pytest.approx(0.95)
    verdict = judge(
        srv,
        score_regex=r"(?i)verdict\W*(correct|incorrect)",
        verdicts={"Correct": 1.0, "incorrect": 0.0},
    )
    assert run(verdict, x("verdict")) == 1.0
    j = judge(srv, scale=1.0)
    assert j.score("Score: 8") == 1.0  # clamped
    assert judge(srv, scale=1.0, clamp=False).score("Score = 8") == 8.0
    with pytest.raises(ValueError, match="no score"):
        j.score("no verdict here")


def test_a_5xx_then_success_is_retried(srv):
    assert run(judge(srv), x("flaky1")) == pytest.approx(0.8)
    assert srv.hits["flaky1"] == 2
    assert run(judge(srv), x("limited1")) == pytest.approx(0.8)  # 429, Retry-After: 0
    assert srv.hits["limited1"] == 2


def test_a_server_that_stays_down_is_an_infra_fault(srv):
    with pytest.raises(RewardInfraError, match="after 3 attempts.*HTTP 503"):
        run(judge(srv), x("down"))
    assert srv.hits["down"] == 3  # retries=2


def test_a_4xx_is_a_config_error_not_retried(srv):
    with pytest.raises(RewardInfraError, match="HTTP 404"):
        run(judge(srv), x("refused"))
    assert srv.hits["refused"] == 1


def test_connection_refused_is_an_infra_fault():
    j = LLMJudge(base_url=f"http://127.0.0.1:{free_port()}/v1", model="m", **FAST)
    with pytest.raises(RewardInfraError, match="ConnectError"):
        run(j, x())


def test_a_slow_server_times_out_as_an_infra_fault(srv):
    t0 = time.perf_counter()
    with pytest.raises(RewardInfraError, match="timed out"):
        run(judge(srv, retries=0), x("slow"))
    assert time.perf_counter() - t0 < 0.8
    # many retries cannot pass deadline_s: it bounds all attempts together
    t0 = time.perf_counter()
    with pytest.raises(RewardInfraError, match="deadline_s=0.3"):
        run(judge(srv, retries=20, deadline_s=0.3), x("slow"))
    assert time.perf_counter() - t0 < 0.8


def test_an_unreadable_judge_reply_is_an_infra_fault_after_retries(srv):
    # a broken judge must not silently zero the policy
    with pytest.raises(RewardInfraError, match="no score in .*turtles"):
        run(judge(srv), x("nonsense"))
    assert srv.hits["nonsense"] == 3


def test_a_template_naming_a_missing_column_is_an_infra_fault(srv):
    with pytest.raises(RewardInfraError, match=r"\{difficulty\}.*columns"):
        run(judge(srv, prompt_template="{difficulty}: {response}"), x())
    assert srv.seen == []


def test_one_object_serves_several_loops_and_pickles(srv):
    j = judge(srv)
    assert [run(j, x()) for _ in range(3)] == pytest.approx([0.8] * 3)
    assert len(j._clients) == 1  # clients of finished loops were dropped
    copy = pickle.loads(pickle.dumps(j))
    assert copy._clients == {} and run(copy, x()) == pytest.approx(0.8)


# --- the plain HTTP scorer ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (0.25, 0.25),
        (1, 1.0),
        ({"score": 0.5}, 0.5),
        ({"score": 0.75, "why": "close enough"}, 0.75),
        ({"correct": 1, "style": 0.5}, {"correct": 1.0, "style": 0.5}),
    ],
)
def test_scorer_reply_forms(srv, reply, expected):
    assert run(scorer(srv), x(reply=reply)) == expected


def test_scorer_posts_the_whole_view(srv):
    item = Scored(
        messages=[{"role": "user", "content": "hi"}],
        final_text=None,
        row={"reply": 1.0, "id": 7},
        finish_reasons=["length"],
        tool_errors=1,
        tool_calls=2,
    )
    assert run(scorer(srv, extra_body={"task": "math"}, headers={"X-K": "v"}), item) == 1.0
    body = srv.seen[0]["body"]
    assert body["messages"] == item.messages and body["final_text"] is None
    assert (body["finish_reasons"], body["tool_errors"], body["tool_calls"]) == (["length"], 1, 2)
    assert body["row"]["id"] == 7 and body["task"] == "math"
    assert srv.seen[0]["headers"]["X-K"] == "v"


def test_non_json_row_values_are_sent_as_plain_json(srv):
    row = {
        "when": datetime.date(2024, 5, 1),
        "tags": {"a"},
        "missing": float("nan"),
        "n": np.int64(3),
        "vec": np.array([1.5, 2.5]),
        "lock": threading.Lock(),  # dataclasses.asdict would fail to deepcopy this
        "reply": {"score": 1},
    }
    assert run(scorer(srv), x(**row)) == 1.0
    sent = srv.seen[0]["body"]["row"]
    assert sent["when"] == "2024-05-01" and sent["tags"] == "{'a'}" and sent["missing"] is None
    assert sent["n"] == 3 and sent["vec"] == [1.5, 2.5] and "lock" in sent["lock"]
    assert jsonable({1: (float("inf"), True)}) == {"1": [None, True]}


@pytest.mark.parametrize("reply", ["fine", {"score": "high"}, {}, {"a": None}, True, [1.0]])
def test_scorer_replies_that_are_not_numbers_are_infra_faults(srv, reply):
    with pytest.raises(RewardInfraError, match="unusable reply"):
        run(scorer(srv, retries=0), x(reply=reply))


def test_scorer_server_errors_are_infra_faults(srv):
    with pytest.raises(RewardInfraError, match="after 2 attempts.*HTTP 500"):
        run(scorer(srv, retries=1), x(reply=1.0, status=500))
    with pytest.raises(RewardInfraError, match="HTTP 422"):
        run(scorer(srv), x(reply=1.0, status=422))
    with pytest.raises(RewardInfraError, match="timed out"):
        run(scorer(srv, retries=0), x(reply=1.0, delay=0.5))


# --- bad config -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"base_url": ""}, "base_url"),
        ({"base_url": "localhost:8000/v1"}, "base_url"),
        ({"model": ""}, "model"),
        ({"request_timeout_s": -1}, "request_timeout_s"),
        ({"request_timeout_s": 5, "deadline_s": 2}, "must not exceed"),
        ({"retries": -1}, "retries"),
        ({"score_regex": r"score: \d+"}, "group"),
        ({"score_regex": "("}, "score_regex"),
        ({"prompt_template": "Grade {answer}"}, "response"),
        ({"prompt_template": "{} {response}"}, "name every field"),
        ({"prompt_template": "{response"}, "format string"),
        ({"scale": 0}, "scale"),
        ({"verdicts": {}}, "verdicts"),
        ({"max_tokens": 0}, "max_tokens"),
    ],
)
def test_bad_judge_config_fails_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LLMJudge(**{"base_url": "http://localhost:8000/v1", "model": "m", **kwargs})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"url": ""}, "url"), ({"deadline_s": -1}, "deadline_s"), ({"headers": {"a": 1}}, "headers")],
)
def test_bad_scorer_config_fails_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HttpScorer(**{"url": "http://localhost:9000/score", **kwargs})


def test_a_bad_spec_fails_when_the_stack_is_built():
    spec = {"_target_": "toolrl.rewards.remote.HttpScorer", "url": "", "timeout_s": 5}
    with pytest.raises(ValueError, match="url"):
        RewardStack({"http": spec})
    # its own deadline must fire before the runner's limit, which would blame the model
    spec = {**spec, "url": "http://127.0.0.1:9/score", "deadline_s": 5, "request_timeout_s": 1}
    with pytest.raises(ValueError, match=r"deadline_s \(5\.0\) must be below timeout_s"):
        RewardStack({"http": spec})


# --- through the real runner, from the shipped YAML -----------------------------------------


def yaml_stack(srv: _Server, **overrides: Any) -> RewardStack:
    cfg = OmegaConf.merge(OmegaConf.load(CONF / "judge.yaml"), OmegaConf.load(CONF / "http.yaml"))
    cfg.judge.base_url = base_url(srv)
    cfg.http.url = f"http://127.0.0.1:{srv.server_address[1]}/score"
    for name in ("judge", "http"):
        cfg[name].update({**FAST, **overrides})
    return RewardStack(cfg)


def test_yaml_stack_scores_through_the_runner(srv):
    runner = RewardRunner(yaml_stack(srv))
    score = asyncio.run(runner.score(x("score8", reply={"ok": 1.0})))
    assert score.components == pytest.approx({"judge": 0.8, "http/ok": 1.0})
    assert score.total == pytest.approx(1.8) and score.failed == ()


def test_a_judge_infra_fault_surfaces_from_the_runner(srv):
    runner = RewardRunner(yaml_stack(srv, retries=1))
    with pytest.raises(RewardInfraError, match="HTTP 503"):
        asyncio.run(runner.score(x("down")))


def test_scorings_run_concurrently(srv):
    runner = RewardRunner(yaml_stack(srv, request_timeout_s=2.0))

    async def main() -> list[Any]:
        return await asyncio.gather(*(runner.score(x("busy", reply=1.0)) for _ in range(8)))

    t0 = time.perf_counter()
    scores = asyncio.run(main())
    elapsed = time.perf_counter() - t0
    assert [s.total for s in scores] == pytest.approx([1.8] * 8)
    assert srv.hits["busy"] == 8
    assert elapsed < 1.2, f"8 scorings of 0.3 s took {elapsed:.2f} s: not concurrent"
