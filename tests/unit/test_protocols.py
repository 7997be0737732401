"""Rollout protocols other than chat tool turns, driven by a scripted engine that streams its ids
through the protocol's pause as vLLM does (the real-vLLM checks: tests/integration/test_inline.py).

    python -m pytest tests/unit/test_protocols.py
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from toolrl.config import ConfigError
from toolrl.rewards.combine import RewardStack
from toolrl.rewards.runner import RewardRunner
from toolrl.rollout.agent_loop import AgentLoop, Episode, LoopConfig
from toolrl.rollout.protocols.inline import InlineTags
from toolrl.rollout.sampler import Generation, Sampler, Sampling
from toolrl.rollout.text import PlainText
from toolrl.tools.base import StatelessTool

SEARCH = {"open": "<search>", "close": "</search>", "tool": "search",
          "answer": "\n<information>{result}</information>\n"}  # fmt: skip
EP = Episode(
    0, [{"role": "user", "content": "Where is the Eiffel Tower?"}], row={"answer": "Paris"}
)


class StreamingEngine:
    """Replies with script(context) and streams the ids one by one through `pause`, cutting
    where it says, as VLLMEngine does; records every request's input and output."""

    def __init__(self, tok, script):
        self.tok, self.script, self.requests = tok, script, []

    async def generate(self, token_ids, sampling: Sampling, pause=None) -> Generation:
        ids = self.tok.encode(self.script(self.tok.decode(token_ids)), add_special_tokens=False)
        finish = "stop"
        for n in range(1, len(ids) + 1):
            if ids[n - 1] in sampling.stop_token_ids:
                ids = ids[:n]
                break
            if n == sampling.max_new_tokens:
                ids, finish = ids[:n], "length"
                break
            cut = pause(ids[:n]) if pause is not None else None
            if cut is not None:
                ids = ids[:cut]
                break
        self.requests.append((list(token_ids), ids))
        return Generation(ids, [-0.5] * len(ids), finish)


class Search(StatelessTool):
    """Answers each query with a fresh random integer, so every answer is told apart."""

    name = "search"

    def __init__(self, delay_for: str | None = None):
        self.queries, self.answers, self.delay_for = [], [], delay_for
        self.release = asyncio.Event()

    def schema(self):
        params = {"type": "object", "properties": {"query": {"type": "string"}},
                  "required": ["query"]}  # fmt: skip
        return {"type": "function", "function": {"name": "search", "parameters": params}}

    async def call(self, key, arguments):
        self.queries.append(arguments["query"])
        if arguments["query"] == self.delay_for:
            await self.release.wait()
        answer = str(random.randrange(10**9))
        self.answers.append(answer)
        return answer, True


async def says_paris(x) -> float:
    return float(x.final_text is not None and "<answer>Paris</answer>" in x.final_text)


@pytest.fixture(scope="module")
def tok(embedded_base):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_base)


def inline_loop(tok, script, tool=None, chat_template=True, **cfg):
    tool = tool or Search()
    protocol = InlineTags(tok, [tool.schema()], [SEARCH], ["</answer>"], chat_template)
    rewards = RewardRunner(RewardStack({"paris": {"_target_": f"{__name__}.says_paris"}}))
    engine = StreamingEngine(tok, script)
    cfg.setdefault("max_total_tokens", 1024)
    loop = AgentLoop(engine, protocol, {"search": tool}, rewards, LoopConfig(**cfg),
                     PlainText(tok).truncate)  # fmt: skip
    return loop, engine, tool


def by_segment(*texts):
    """Segment k (k inserted answers so far) gets texts[k]."""
    return lambda context: texts[min(context.count("<information>"), len(texts) - 1)]


def run(loop, ep=EP):
    return asyncio.run(loop.run(ep, Sampler(max_new_tokens=200)))


def test_search_pauses_at_the_close_tag_inserts_the_answer_and_continues(tok):
    first = "Let me look. <search> Eiffel Tower city </search> and text the pause must drop"
    second = "So <answer>Paris</answer> trailing text past the end tag"
    loop, engine, tool = inline_loop(tok, by_segment(first, second))
    t = run(loop)
    assert tool.queries == ["Eiffel Tower city"] and len(engine.requests) == 2  # calls + 1
    (ctx0, out0), (ctx1, out1) = engine.requests
    # each request continues the trajectory exactly; the resumed one ends with the answer ids
    inserted = PlainText(tok).encode(f"\n<information>{tool.answers[0]}</information>\n")
    assert ctx0 == t.token_ids[: t.prompt_len]
    assert ctx1 == ctx0 + out0 + inserted and t.token_ids == ctx1 + out1
    assert tok.decode(out0).endswith("</search>") and tok.decode(out1).endswith("</answer>")
    # the sampled ids are masked in, the answer out; nothing sampled decodes to inserted text
    assert [t.loss_mask[i] for i in range(len(ctx0), len(ctx1))] == [1] * len(out0) + [0] * len(
        inserted
    )
    assert tool.answers[0] not in tok.decode(
        [i for i, m in zip(t.token_ids, t.loss_mask, strict=True) if m]
    )
    assert t.info["final_text"] == tok.decode(out0) + tok.decode(out1) and t.reward == 1.0
    assert [c.arguments for c in t.turns[0].calls] == [{"query": "Eiffel Tower city"}]
    prompt = tok.decode(t.token_ids[: t.prompt_len])
    assert prompt == tok.apply_chat_template(
        EP.messages, add_generation_prompt=True, tokenize=False
    )


def test_a_close_tag_without_its_open_tag_is_an_error_the_model_reads(tok):
    loop, engine, tool = inline_loop(tok, by_segment("just </search>", "<answer>Paris</answer>"))
    t = run(loop)
    assert tool.queries == [] and t.turns[0].parse_errors == [
        "</search> without <search> before it"
    ]
    assert "Error: </search> without <search>" in tok.decode(engine.requests[1][0])
    assert t.num_tool_errors == 1 and t.reward == 1.0


def test_end_of_text_ends_the_trajectory_and_base_models_get_plain_prompts(tok):
    loop, engine, _ = inline_loop(tok, by_segment("Paris." + tok.eos_token), chat_template=False)
    t = run(loop)
    assert t.token_ids[: t.prompt_len] == tok.encode("Where is the Eiffel Tower?")
    assert t.info["final_text"] == "Paris." and len(engine.requests) == 1


def test_limits_apply_to_inline_calls(tok):
    ask = "<search>q</search>"
    loop, engine, tool = inline_loop(tok, by_segment(ask), max_tool_calls=2, max_turns=4)
    t = run(loop)
    assert len(tool.queries) == 2 and len(t.turns) == 4  # the third call is refused, the 4th turn
    assert "tool call limit reached (2 per trajectory)" in t.turns[2].results[0].content
    assert t.info["final_text"] is None and not t.turns[3].calls  # out of turns: nothing run


def test_a_slow_inline_tool_does_not_hold_up_other_trajectories(tok):
    tool = Search(delay_for="slow")
    script = lambda ctx: (  # noqa: E731
        "<answer>Paris</answer>" if "<information>" in ctx
        else "<search>slow</search>" if "SLOW" in ctx else "<search>fast</search>"
    )  # fmt: skip
    loop, _, _ = inline_loop(tok, script, tool)
    slow = Episode(1, [{"role": "user", "content": "SLOW"}], row={})

    async def main():
        slow_task = asyncio.ensure_future(loop.run(slow, Sampler(max_new_tokens=64)))
        done = await loop.run_many([EP] * 4, Sampler(max_new_tokens=64))
        assert not slow_task.done() and all(t.reward == 1.0 for t in done)
        tool.release.set()
        return await slow_task

    assert asyncio.run(main()).info["final_text"] is not None


def test_bad_inline_settings_fail_before_ray(tok):
    from tests.unit.test_config import load
    from toolrl.validate import validate

    with pytest.raises(ConfigError, match="calls 'search', not configured"):
        validate(load("protocol=inline"))  # the default tools hold only the calculator
    with pytest.raises(ConfigError, match=r"answer must hold \{result\}"):
        validate(load("protocol=inline", "tools=[search]", "protocol.tags.0.answer=x"))
    validate(load("protocol=inline", "tools=[search]"))
    with pytest.raises(ValueError, match="not configured"):
        InlineTags(tok, [], [SEARCH])


# --- environment turns ------------------------------------------------------------------------


class Broken:
    def reset(self, row):
        return None

    def step(self, text):
        raise RuntimeError("game server crashed")


def env_loop(tok, script, environment, **cfg):
    from toolrl.rollout.chat import ChatBuilder
    from toolrl.rollout.parsers.hermes import HermesParser
    from toolrl.rollout.protocols.environment import EnvironmentTurns
    from toolrl.tools.calculator import Calculator

    tools = {"calculator": Calculator()}
    chat = ChatBuilder(tok, [t.schema() for t in tools.values()])
    protocol = EnvironmentTurns(chat, HermesParser(), environment)
    stack = {"solved": {"_target_": "toolrl.envs.guess.solved"}}
    engine = StreamingEngine(tok, script)
    loop = AgentLoop(engine, protocol, tools, RewardRunner(RewardStack(stack)),
                     LoopConfig(max_turns=cfg.pop("max_turns", 5), max_total_tokens=2048),
                     PlainText(tok).truncate)  # fmt: skip
    return loop, engine, chat


def by_turn(*texts):
    """Assistant turn k (k assistant headers before it) gets texts[k]."""
    return lambda ctx: texts[min(ctx.count("<|im_start|>assistant") - 1, len(texts) - 1)]


GAME = Episode(0, [{"role": "user", "content": "Guess my number, 1 to 10."}], row={"secret": 7})


def test_environment_answers_each_turn_as_a_user_message_with_turn_rewards(tok):
    calc = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "2+3"}}\n</tool_call>'
    script = by_turn(calc + "<|im_end|>", "5<|im_end|>", "8<|im_end|>", "7<|im_end|>")
    env = {"_target_": "toolrl.envs.guess.GuessNumber", "miss_penalty": 0.1}
    loop, engine, chat = env_loop(tok, script, env)
    t = run(loop, GAME)
    assert [len(turn.calls) for turn in t.turns] == [1, 0, 0, 0]  # a tool turn, then guesses
    assert [turn.observation for turn in t.turns] == [None, "Higher.", "Lower.", None]
    assert [turn.reward for turn in t.turns] == pytest.approx([0.0, -0.1, -0.1, 0.0])
    assert t.info["final_text"] == "7" and t.reward == 1.0
    assert t.total_reward == pytest.approx(0.8)
    # each resumed request ends with the observation's user turn, appended to what was sampled
    (_, out1), (ctx2, _) = engine.requests[1], engine.requests[2]
    assert ctx2[-len(chat.user_turn_ids("Higher.")) :] == chat.user_turn_ids("Higher.")
    assert ctx2 == engine.requests[1][0] + out1 + chat.user_turn_ids("Higher.")
    assert t.loss_mask[len(ctx2) - 1] == 0 and t.check() is None


def test_a_crashing_environment_is_an_infra_fault_not_a_zero(tok):
    loop, _, _ = env_loop(tok, by_turn("5<|im_end|>"), {"_target_": f"{__name__}.Broken"})
    t = run(loop, GAME)
    assert t.infra_error is not None and "game server crashed" in t.infra_error


def test_guess_game_steps_and_outcome():
    from toolrl.envs.guess import GuessNumber, solved
    from toolrl.rewards.base import Scored

    game = GuessNumber(miss_penalty=0.2, hit_reward=0.5)
    assert game.reset({"secret": 4, "low": 1, "high": 9}) is None
    steps = [game.step(t) for t in ("no idea", "maybe 2", "9?", "it is 4")]
    assert [(s.observation, s.reward, s.done) for s in steps] == [
        ("Answer with one number between 1 and 9.", -0.2, False),
        ("Higher.", -0.2, False),
        ("Lower.", -0.2, False),
        ("Correct!", 0.5, True),
    ]
    assert solved(Scored([], "4", {"secret": 4})) == 1.0
    assert solved(Scored([], "5", {"secret": 4})) == solved(Scored([], None, {"secret": 4})) == 0.0


def test_the_worker_builds_each_shipped_protocol_with_the_parts_it_names(tok):
    from omegaconf import OmegaConf

    from toolrl.rollout.parsers.reasoning import TagReasoning
    from toolrl.rollout.protocols.chat import ChatToolTurns
    from toolrl.rollout.protocols.environment import EnvironmentTurns
    from toolrl.tools.search import SEARCH_SCHEMA
    from toolrl.workers.rollout import build_protocol

    conf = Path(__file__).resolve().parents[2] / "conf"
    parser = {
        "_target_": "toolrl.rollout.parsers.hermes.HermesParser",
        "reasoning": {"_target_": "toolrl.rollout.parsers.reasoning.TagReasoning"},
    }
    built = {
        name: build_protocol(
            OmegaConf.to_container(OmegaConf.load(conf / "protocol" / f"{name}.yaml")),
            parser, tok, [SEARCH_SCHEMA],
        )
        for name in ("chat", "inline", "environment")
    }  # fmt: skip
    assert type(built["chat"]) is ChatToolTurns and isinstance(
        built["chat"].reasoning, TagReasoning
    )
    assert isinstance(built["inline"], InlineTags) and built["inline"].arguments == {
        "search": "query"
    }
    env = built["environment"]
    assert (
        isinstance(env, EnvironmentTurns) and env.make_env() is not env.make_env()
    )  # per trajectory
