"""The multi-turn loop, driven by a scripted fake engine over the embedded model's real tokenizer
and chat template (the real-vLLM version of these checks is tests/integration/test_rollout.py)."""

from __future__ import annotations

import asyncio
import copy
import importlib.util
import json
from pathlib import Path

import pytest

from toolrl.rewards.base import RewardInfraError, Scored
from toolrl.rewards.combine import RewardStack
from toolrl.rewards.runner import RewardRunner
from toolrl.rollout.agent_loop import AgentLoop, Episode, LoopConfig
from toolrl.rollout.chat import ChatBuilder
from toolrl.rollout.parsers.hermes import HermesParser
from toolrl.rollout.protocols.chat import ChatToolTurns
from toolrl.rollout.sampler import Generation, Sampler, Sampling
from toolrl.rollout.text import PlainText
from toolrl.tools.base import StatelessTool, ToolInfraError
from toolrl.tools.calculator import Calculator

CALL = '<tool_call>\n{{"name": "{name}", "arguments": {args}}}\n</tool_call>'


def call(expr: str, name: str = "calculator") -> str:
    return CALL.format(name=name, args=json.dumps({"expression": expr}))


def replies(*texts: str):
    """A script answering turn k with texts[k] (the last text repeats)."""
    return lambda turn, ctx: texts[min(turn, len(texts) - 1)]


class ScriptedEngine:
    """Replies with the next scripted text for each turn; logprob -0.5 per sampled id."""

    def __init__(self, tok, script):
        self.tok, self.script, self.contexts = tok, script, []

    async def generate(self, token_ids: list[int], sampling: Sampling, pause=None) -> Generation:
        assert pause is None  # chat turns end at the end-of-turn id
        self.contexts.append(list(token_ids))
        context = self.tok.decode(token_ids)
        turn = context.count("<|im_start|>assistant") - 1  # assistant headers so far
        text = self.script(turn, context)
        ids = self.tok.encode(text, add_special_tokens=False)
        if len(ids) > sampling.max_new_tokens:
            return Generation(
                ids[: sampling.max_new_tokens], [-0.5] * sampling.max_new_tokens, "length"
            )
        return Generation(ids, [-0.5] * len(ids), "stop")


class Recorder(StatelessTool):
    """A tool that records its lifecycle and can sleep, fail or wait on an event."""

    name = "rec"

    def __init__(self, behaviour="echo"):
        self.behaviour, self.log, self.release = behaviour, [], asyncio.Event()

    def schema(self):
        return {"type": "function", "function": {"name": "rec", "parameters": {"type": "object"}}}

    async def open(self, key):
        self.log.append(("open", key))

    async def close(self, key):
        self.log.append(("close", key))

    async def call(self, key, arguments):
        self.log.append(("call", key))
        if self.behaviour == "hang":
            await asyncio.sleep(3600)
        if self.behaviour == "boom":
            raise RuntimeError("bug in tool")
        if self.behaviour == "infra":
            raise ToolInfraError("sandbox died")
        if self.behaviour == "wait":
            await self.release.wait()
        if self.behaviour == "flood":  # 10 MB, and a second call after it
            return "ab" * 5_000_000, True
        return f"rec:{arguments.get('expression')}", True


@pytest.fixture(scope="module")
def tok(embedded_base):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_base)


def make_loop(tok, script, tools=None, reasoning=None, **cfg):
    tools = tools or {"calculator": Calculator()}
    chat = ChatBuilder(tok, [t.schema() for t in tools.values()])
    engine = ScriptedEngine(tok, script)
    protocol = ChatToolTurns(chat, HermesParser(), reasoning)
    loop = AgentLoop(engine, protocol, tools, REWARDS, LoopConfig(**cfg), PlainText(tok).truncate)
    return loop, engine, chat


async def contains_answer(x: Scored) -> float:
    """1.0 when the final text holds the row's answer (async: awaited, no process pool)."""
    return float(x.final_text is not None and x.row["answer"] in x.final_text)


REWARDS = RewardRunner(RewardStack({"answer": {"_target_": f"{__name__}.contains_answer"}}))


def episode(prompt_id: int, content: str, answer: str, seed: int, **kw) -> Episode:
    return Episode(
        prompt_id, [{"role": "user", "content": content}], seed, {"answer": answer}, **kw
    )


EP = episode(0, "What is 6 * 7?", "42", seed=1)


def run(loop, ep=EP):
    return asyncio.run(loop.run(ep, Sampler(max_new_tokens=64)))


def test_tool_call_then_answer_is_token_exact(tok):
    script = replies(call("6 * 7") + "<|im_end|>", "The answer is 42.<|im_end|>")
    loop, engine, chat = make_loop(tok, script)
    t = run(loop)
    assert t.reward == 1.0 and len(t.turns) == 2 and t.info["final_text"] == "The answer is 42."
    first = tok.encode(script(0, ""), add_special_tokens=False)
    second = tok.encode(script(1, ""), add_special_tokens=False)
    # The trajectory is prompt + sampled + (glue, tool answer, header) + sampled, ids untouched.
    assert t.token_ids[: t.prompt_len] == chat.prompt_ids(EP.messages)
    assert t.token_ids[t.turns[0].start : t.turns[0].end] == first
    assert t.token_ids[t.turns[1].start : t.turns[1].end] == second
    assert engine.contexts[1] == t.token_ids[: t.turns[1].start]
    between = tok.decode(t.token_ids[t.turns[0].end : t.turns[1].start])
    assert "<tool_response>\n42\n</tool_response>" in between
    masked_in = tok.decode([i for i, m in zip(t.token_ids, t.loss_mask, strict=True) if m])
    assert "tool_response" not in masked_in and "<|im_start|>" not in masked_in
    assert t.turns[0].results[0].content == "42" and t.num_tool_errors == 0


def test_malformed_call_becomes_an_error_the_model_reads(tok):
    bad = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "6 * 7"}\n</tool_call>'
    script = replies(bad + "<|im_end|>", "42<|im_end|>")
    loop, engine, _ = make_loop(tok, script)
    t = run(loop)
    assert t.turns[0].parse_errors and t.num_tool_errors == 1
    assert "invalid JSON" in tok.decode(engine.contexts[1]) and t.reward == 1.0


def test_unknown_tool_and_crashing_tool_answer_with_text(tok):
    script = replies(
        call("1", name="nope") + call("2", name="rec") + "<|im_end|>", "done<|im_end|>"
    )
    loop, engine, _ = make_loop(tok, script, tools={"rec": Recorder("boom")})
    t = run(loop)
    texts = [r.content for r in t.turns[0].results]
    assert "unknown tool 'nope'" in texts[0] and "bug in tool" in texts[1]
    assert t.infra_error is None and t.num_tool_errors == 2


def test_tool_timeout_is_enforced_by_the_loop(tok):
    script = replies(call("x", name="rec") + "<|im_end|>", "ok<|im_end|>")
    loop, _, _ = make_loop(tok, script, tools={"rec": Recorder("hang")}, tool_timeout_s=0.05)
    t = run(loop)
    assert "timed out" in t.turns[0].results[0].content and not t.turns[0].results[0].ok


def test_infra_fault_marks_trajectory_and_closes_tools(tok):
    rec = Recorder("infra")
    script = replies(call("x", name="rec") + "<|im_end|>")
    loop, _, _ = make_loop(tok, script, tools={"rec": rec})
    t = run(loop)
    assert t.infra_error and "sandbox died" in t.infra_error
    assert [e[0] for e in rec.log] == ["open", "call", "close"]


def test_out_of_turns_or_tokens_gives_no_answer(tok):
    script = replies(call("1 + 1") + "<|im_end|>")
    loop, _, _ = make_loop(tok, script, max_turns=2)
    t = run(loop)
    assert len(t.turns) == 2 and t.info["final_text"] is None and t.reward == 0.0
    loop, _, _ = make_loop(tok, replies("42 " * 200), max_total_tokens=120)
    t = run(loop)
    assert t.turns[-1].finish_reason == "length" and len(t.token_ids) == 120 and t.reward == 0.0
    # a turn cut by the budget is still read: its malformed call counts as a tool error
    loop, _, _ = make_loop(tok, replies("<tool_call>\n{oops</tool_call>" + "x " * 200))
    t = run(loop)
    assert t.turns[-1].finish_reason == "length" and t.num_tool_errors == 1
    assert t.turns[-1].results == [] and t.info["final_text"] is None


def test_state_is_per_trajectory_and_a_slow_tool_does_not_stall_others(tok):
    rec = Recorder("wait")
    slow = episode(0, "slow", "x", seed=1)
    fast = episode(1, "fast", "42", seed=2)

    def script(turn, ctx):
        if "slow" in ctx and turn == 0:
            return call("s", name="rec") + "<|im_end|>"
        return "42<|im_end|>"

    loop, _, _ = make_loop(tok, script, tools={"rec": rec})

    async def main():
        sampler = Sampler(max_new_tokens=64)
        slow_task = asyncio.create_task(loop.run(slow, sampler))
        done_fast = await asyncio.wait_for(loop.run(fast, sampler), timeout=10)
        assert done_fast.reward == 1.0 and not slow_task.done()  # the slow call is still pending
        rec.release.set()
        return await asyncio.wait_for(slow_task, timeout=10)

    t = asyncio.run(main())
    assert t.turns[0].results[0].content == "rec:s"
    keys = {k for _, k in rec.log}
    assert len(keys) == 1 and [e[0] for e in rec.log] == ["open", "call", "close"]


class SlowOpen(Recorder):
    """Opening takes a while; records whether each call saw an open session."""

    async def open(self, key):
        self.log.append(("open-start", key))
        await asyncio.sleep(0.05)
        if self.behaviour == "open-fails":
            raise OSError("no sandbox")
        self.log.append(("open", key))

    async def call(self, key, arguments):
        self.log.append(("call", ("open", key) in self.log))
        return "x" * 50, True


def test_parallel_calls_wait_for_one_open_and_long_output_is_cut(tok):
    rec = SlowOpen()
    two = call("a", name="rec") + "\n" + call("b", name="rec") + "<|im_end|>"
    loop, engine, chat = make_loop(
        tok, replies(two, "done<|im_end|>"), tools={"rec": rec}, max_tool_output_tokens=3
    )
    t = run(loop)
    assert [e for e in rec.log if e[0] == "call"] == [("call", True), ("call", True)]
    assert sum(e[0] == "open-start" for e in rec.log) == 1 and rec.log[-1][0] == "close"
    full = len(chat._encode_plain("x" * 50))
    for r in t.turns[0].results:  # cut in tokens, and the model is told how many are gone
        kept, marker = r.content.split("\n[output truncated: ")
        assert set(kept) == {"x"} and len(chat._encode_plain(kept)) == 3, r.content
        assert marker == f"{full - 3} more tokens]"


def test_a_10_mb_tool_answer_is_cut_by_characters_without_tokenizing_it_all(tok):
    loop, _, chat = make_loop(
        tok, replies(call("a", name="rec") + "<|im_end|>", "done<|im_end|>"),
        tools={"rec": Recorder("flood")}, max_tool_output_tokens=8,
    )  # fmt: skip
    t = run(loop)
    kept, marker = t.turns[0].results[0].content.split("\n[output truncated: ")
    assert kept and set(kept) <= {"a", "b"} and len(chat._encode_plain(kept)) <= 8
    assert marker == f"{10_000_000 - len(kept)} more characters]"
    assert t.info["final_text"] == "done"  # the trajectory goes on


def test_a_session_that_cannot_open_is_an_infra_fault(tok):
    rec = SlowOpen("open-fails")
    loop, _, _ = make_loop(tok, replies(call("a", name="rec") + "<|im_end|>"), tools={"rec": rec})
    t = run(loop)
    assert t.infra_error and "no sandbox" in t.infra_error
    assert not any(e[0] == "close" for e in rec.log)  # never opened, so nothing to close


# --- the reasoning step runs before the parser -------------------------------------------


def trl_template(name: str) -> str:
    """A real chat template shipped by trl (read as a file; trl is never imported)."""
    spec = importlib.util.find_spec("trl")
    assert spec and spec.submodule_search_locations, "pip install --no-deps trl==1.16.0"
    return (Path(spec.submodule_search_locations[0]) / "chat_templates" / name).read_text()


def _reasoning_loop(tok, script, template: str | None = None):
    from toolrl.rollout.parsers.reasoning import TagReasoning

    if template is not None:
        tok = copy.deepcopy(tok)
        tok.chat_template = trl_template(template)
    return make_loop(tok, script, {"rec": Recorder()}, TagReasoning(), max_total_tokens=4096)


def run_long(loop):
    return asyncio.run(loop.run(EP, Sampler(max_new_tokens=256)))


def test_calls_inside_reasoning_are_counted_never_run(tok):
    thought = "<think>\nMaybe " + call("1 + 1", name="rec") + " would help.\n</think>\n\n"
    script = replies(thought + call("6 * 7", name="rec") + "<|im_end|>", "42<|im_end|>")
    loop, _, _ = _reasoning_loop(tok, script)
    t = run_long(loop)
    assert [c.arguments for c in t.turns[0].calls] == [{"expression": "6 * 7"}]
    assert t.turns[0].reasoning_calls == 1 and t.num_reasoning_calls == 1
    assert [r.content for r in t.turns[0].results] == ["rec:6 * 7"]
    assert [e for e, _ in loop.tools["rec"].log].count("call") == 1
    assert t.num_tool_errors == 0 and t.info["final_text"] == "42"


def test_unclosed_reasoning_holds_no_calls_and_no_errors(tok):
    script = replies("<think>\n" + call("6 * 7", name="rec") + "<|im_end|>")
    loop, _, _ = _reasoning_loop(tok, script)
    t = run_long(loop)
    assert len(t.turns) == 1 and t.turns[0].calls == [] and t.num_tool_errors == 0
    assert t.turns[0].reasoning_calls == 1 and loop.tools["rec"].log == []


def test_a_block_the_prompt_opened_ends_at_the_first_end_tag(tok):
    # Qwen3.5's thinking template ends its generation prompt with "<think>\n": the turn
    # starts inside the block, with no opening tag in what the model samples.
    inner = "Let me " + call("1 + 1", name="rec") + "\n</think>\n\n"
    final = "Done.\n</think>\n\nThe answer: 42<|im_end|>"  # the tool turn reopens it too
    script = replies(inner + call("6 * 7", name="rec") + "<|im_end|>", final)
    loop, _, chat = _reasoning_loop(tok, script, template="qwen3_5_think.jinja")
    assert chat.generation_prompt.endswith("<think>\n") and loop.protocol.opens_reasoning
    t = run_long(loop)
    assert [c.arguments for c in t.turns[0].calls] == [{"expression": "6 * 7"}]
    assert t.turns[0].reasoning_calls == 1 and t.info["final_text"] == "The answer: 42"
    # the embedded template opens no block, so the same text would hold two calls
    assert not _reasoning_loop(tok, script)[0].protocol.opens_reasoning


def test_a_think_tag_in_a_tool_description_opens_no_reasoning(tok):
    # Only what the generation prompt adds decides it, not the tool schemas above it.
    from toolrl.rollout.parsers.reasoning import TagReasoning

    schema = Calculator().schema()
    schema["function"]["description"] = "Wrap thoughts in <think> before calling."
    chat = ChatBuilder(tok, [schema])
    assert chat.generation_prompt == "<|im_start|>assistant\n"
    assert not TagReasoning().opened_by(chat.generation_prompt)


# --- rewards and a row's own tools --------------------------------------------------------


async def graded(x: Scored) -> dict[str, float]:
    """Two named components, to see each one reach the trajectory."""
    return {"answered": float(x.final_text is not None), "calls": float(x.tool_calls)}


async def judge_down(x: Scored) -> float:
    raise RewardInfraError("judge at 127.0.0.1:9 refused the connection")


def test_every_reward_component_reaches_the_trajectory(tok):
    script = replies(call("6 * 7") + "<|im_end|>", "The answer is 42.<|im_end|>")
    loop, _, _ = make_loop(tok, script)
    stack = {"answer": {"_target_": f"{__name__}.contains_answer", "weight": 2.0}}
    stack["g"] = {"_target_": f"{__name__}.graded", "weight": 0.5}
    loop.rewards = RewardRunner(RewardStack(stack))
    t = run(loop)
    assert t.info["reward_components"] == {"answer": 1.0, "g/answered": 1.0, "g/calls": 1.0}
    assert t.reward == 2.0 * 1.0 + 0.5 * (1.0 + 1.0) and t.info["reward_failures"] == 0
    # the reward saw the conversation: the call, the tool's answer, the final text
    assert [turn.content for turn in t.turns] == ["", "The answer is 42."]


def test_per_turn_credit_lands_on_the_turns(tok):
    # turn 0 calls a tool that does not exist (one error), turn 1 answers
    script = replies(call("1", name="nope") + "<|im_end|>", "The answer is 42.<|im_end|>")
    loop, _, _ = make_loop(tok, script)
    shaping = {"_target_": "toolrl.rewards.format.tool_error_penalty", "per_turn": True}
    stack = {"answer": {"_target_": f"{__name__}.contains_answer"}, "shaping": shaping}
    loop.rewards = RewardRunner(RewardStack(stack))
    t = run(loop)
    assert t.reward == 1.0  # the final reward alone
    assert [turn.reward for turn in t.turns] == pytest.approx([-0.1, 0.0])
    assert t.total_reward == pytest.approx(0.9)
    assert t.info["reward_components"] == pytest.approx({"answer": 1.0, "shaping": -0.1})


def test_a_reward_that_fails_outside_the_model_is_an_infra_fault(tok):
    loop, _, _ = make_loop(tok, replies("42<|im_end|>"))
    loop.rewards = RewardRunner(RewardStack({"judge": {"_target_": f"{__name__}.judge_down"}}))
    t = run(loop)
    assert t.infra_error is not None and "refused" in t.infra_error and t.reward == 0.0


def test_a_row_offers_only_its_own_tools(tok):
    tools = {"calculator": Calculator(), "rec": Recorder()}
    script = replies(call("1", name="rec") + "<|im_end|>", "done<|im_end|>")
    loop, engine, _ = make_loop(tok, script, tools)
    t = asyncio.run(loop.run(episode(0, "Hi", "x", 1, tools=["calculator"]), Sampler()))
    prompt = tok.decode(t.token_ids[: t.prompt_len])
    assert '"name": "calculator"' in prompt and '"name": "rec"' not in prompt
    assert t.turns[0].results[0].content == "Error: unknown tool 'rec'; tools: calculator"
    assert tools["rec"].log == []  # never opened nor called
    everything = asyncio.run(loop.run(episode(0, "Hi", "x", 1), Sampler()))
    assert '"name": "rec"' in tok.decode(everything.token_ids[: everything.prompt_len])


class Gate(StatelessTool):
    """A tool that takes `delay` seconds a call and records how many calls ran at once."""

    name = "rec"

    def __init__(self, delay: float, max_concurrency: int | None):
        self.delay, self.max_concurrency = delay, max_concurrency
        self.running = self.peak = 0

    def schema(self):
        return {"type": "function", "function": {"name": "rec", "parameters": {"type": "object"}}}

    async def call(self, key, arguments):
        self.running += 1
        self.peak = max(self.peak, self.running)
        await asyncio.sleep(self.delay)
        self.running -= 1
        return "done", True


@pytest.mark.parametrize("limit", [None, 2])
def test_a_tool_declaring_max_concurrency_gets_that_many_calls_at_once(tok, limit):
    """Eight trajectories call at once; a limit of 2 queues the rest, and the queueing does not
    count towards the call timeout (4 rounds x 0.1 s > the 0.25 s timeout)."""
    gate = Gate(0.1, limit)
    script = replies(call("1", name="rec") + "<|im_end|>", "42<|im_end|>")
    loop, _, _ = make_loop(tok, script, tools={"rec": gate}, tool_timeout_s=0.25)
    eps = [episode(i, "q", "42", seed=i) for i in range(8)]
    trajs = asyncio.run(loop.run_many(eps, Sampler(max_new_tokens=64)))
    assert gate.peak == (8 if limit is None else 2)
    assert all(t.reward == 1.0 and t.num_tool_calls == 1 and t.num_tool_errors == 0 for t in trajs)
