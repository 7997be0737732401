"""Rewards from config: build the weighted stack of reward components and combine their values.

A spec names a reward by `_target_` plus its arguments, and three keys of its own:

    name       the component's name in logs (default: the last part of `_target_`)
    weight     its factor in the total (default 1.0)
    timeout_s  its time limit per scoring, used by the runner (default 10 s); a reward with
               its own `deadline_s` (the remote ones) must set it below this

The rule for `_target_`: a function gets the other keys bound as keyword arguments (as if
Hydra's `_partial_: true` were written; writing it is allowed); a class is instantiated with
them and the instance is the reward. Either way `hydra.utils.instantiate` does the work, so
nested `_target_`s work too. A list of specs or a mapping name -> spec is accepted; the mapping
form is what several `conf/reward/*.yaml` files merge into when Hydra composes them:

    stack = RewardStack([{"_target_": "toolrl.rewards.math.math_answer", "weight": 1.0}])
    stack.combine({"math_answer": 1.0}).total        # -> 1.0

Total = sum over components of weight * value, where a mapping value counts as the sum of
its entries and is logged per key as `name/key`. A `PerTurn` value also counts as its sum
(logged as `name`), and its weighted values add up per turn in `Score.per_turn`, so the
trajectory can credit each turn its share; `Score.outcome` is the rest, the final reward. A spec that does not import, or does not
accept its arguments, raises ValueError naming the spec here, at construction.

    python -m pytest tests/unit/test_rewards.py
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from numbers import Real
from typing import Any

import hydra.utils
from omegaconf import DictConfig, ListConfig, OmegaConf

from toolrl.rewards.base import PerTurn, RewardValue, normalize_value

DEFAULT_TIMEOUT_S = 10.0
OWN_KEYS = ("name", "weight", "timeout_s")


@dataclass(frozen=True)
class Component:
    """One built reward: what to call, how much it counts, how long it may take."""

    name: str
    fn: Callable[..., Any]
    weight: float = 1.0
    timeout_s: float = DEFAULT_TIMEOUT_S
    is_async: bool = False  # awaited in the caller's loop; sync ones run in the process pool


@dataclass(frozen=True)
class Score:
    """The weighted reward, split into the final (outcome) part and per-turn credit, and every
    component value, for the loss and for logging."""

    outcome: float  # credited at the end of the trajectory
    components: dict[str, float]
    # Components that raised or ran out of time on the model's output; each counted as 0.
    failed: tuple[str, ...] = ()
    per_turn: tuple[float, ...] = ()  # credited to each assistant turn; () when none is
    # Each logged component's weight in the total (GDPO normalises components one by one).
    weights: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return self.outcome + sum(self.per_turn)

    @property
    def model_failures(self) -> int:
        return len(self.failed)


def flatten(name: str, value: RewardValue) -> dict[str, float]:
    """`{name: v}` for a number (a PerTurn's sum), `{name/key: v}` for a mapping; ValueError for
    anything else."""
    value = normalize_value(name, value)
    if isinstance(value, PerTurn):
        return {name: sum(value.values)}
    if isinstance(value, dict):
        return {f"{name}/{k}": v for k, v in value.items()}
    return {name: value}


class RewardStack:
    """The reward components of a run, built from specs; combines their values into a Score."""

    def __init__(self, specs: Sequence[Mapping[str, Any]] | Mapping[str, Mapping[str, Any]]):
        self.components: list[Component] = [build_component(s, n) for n, s in _named(specs)]
        if not self.components:
            raise ValueError("a reward stack needs at least one reward spec")
        names = [c.name for c in self.components]
        if len(set(names)) != len(names):
            raise ValueError(f"reward names must be unique, got {names}")

    def combine(self, values: Mapping[str, RewardValue | None], num_turns: int = 0) -> Score:
        """Weighted total of each component's value; None marks a failed component (0).
        PerTurn values must hold `num_turns` entries."""
        outcome, logged, failed, weights = 0.0, {}, [], {}
        per_turn = [0.0] * num_turns
        for c in self.components:
            value = values[c.name]
            if value is None:
                failed.append(c.name)
                logged[c.name], weights[c.name] = 0.0, c.weight
                continue
            value = normalize_value(c.name, value, num_turns)
            flat = flatten(c.name, value)
            logged.update(flat)
            weights.update(dict.fromkeys(flat, c.weight))
            if isinstance(value, PerTurn):
                per_turn = [p + c.weight * v for p, v in zip(per_turn, value.values, strict=True)]
            else:
                outcome += c.weight * sum(flat.values())
        credited = tuple(per_turn) if any(per_turn) else ()
        return Score(outcome, logged, tuple(failed), credited, weights)


def _named(specs: Any) -> list[tuple[str | None, Mapping[str, Any]]]:
    if isinstance(specs, DictConfig | ListConfig):
        specs = OmegaConf.to_container(specs, resolve=True)
    if isinstance(specs, Mapping):
        return [(str(k), v) for k, v in specs.items()]
    if isinstance(specs, Sequence) and not isinstance(specs, str):
        return [(None, s) for s in specs]
    raise ValueError(f"reward specs must be a list or a mapping name -> spec, got {specs!r}")


def build_component(spec: Mapping[str, Any], name: str | None = None) -> Component:
    """Build one component from its spec; ValueError naming the spec when it cannot be built."""
    if isinstance(spec, DictConfig):
        spec = OmegaConf.to_container(spec, resolve=True)
    if not isinstance(spec, Mapping) or not isinstance(spec.get("_target_"), str):
        raise ValueError(f"reward spec {spec!r} needs a `_target_` dotted path")
    args = {k: v for k, v in spec.items() if k not in OWN_KEYS}
    name = str(spec.get("name") or name or spec["_target_"].rsplit(".", 1)[-1])
    weight, timeout_s = spec.get("weight", 1.0), spec.get("timeout_s", DEFAULT_TIMEOUT_S)
    if not isinstance(weight, Real) or not math.isfinite(weight):
        raise ValueError(f"reward spec {dict(spec)!r}: weight must be a finite number")
    if not isinstance(timeout_s, Real) or not timeout_s > 0:
        raise ValueError(f"reward spec {dict(spec)!r}: timeout_s must be a positive number")
    fn = _instantiate(args, spec)
    # A reward with its own deadline (the remote ones) must give up before the runner's
    # limit does, or a slow server would be charged to the model as a timeout.
    deadline = getattr(fn, "deadline_s", None)
    if isinstance(deadline, Real) and deadline >= timeout_s:
        raise ValueError(
            f"reward spec {dict(spec)!r}: deadline_s ({deadline}) must be below timeout_s "
            f"({timeout_s}), so the reward's own deadline fires first"
        )
    return Component(name, fn, float(weight), float(timeout_s), _is_async(fn))


def _instantiate(args: dict[str, Any], spec: Mapping[str, Any]) -> Callable[..., Any]:
    try:
        target = hydra.utils.get_object(args["_target_"])
    except Exception as e:  # hydra raises ImportError or its own errors, depending on the part
        raise ValueError(f"reward spec {dict(spec)!r}: cannot import `_target_`: {e}") from e
    kwargs = {k: v for k, v in args.items() if not k.startswith("_")}
    is_class = inspect.isclass(target)
    if not is_class:
        if not callable(target):
            raise ValueError(f"reward spec {dict(spec)!r}: `_target_` is not callable")
        try:  # checked here, since a partial would only fail at the first scoring
            inspect.signature(target).bind(None, **kwargs)
        except TypeError as e:
            raise ValueError(f"reward spec {dict(spec)!r}: bad arguments: {e}") from e
    try:
        fn = hydra.utils.instantiate(args, _partial_=not is_class, _convert_="all")
    except Exception as e:
        raise ValueError(f"reward spec {dict(spec)!r}: cannot build: {e}") from e
    if not callable(fn):
        raise ValueError(f"reward spec {dict(spec)!r}: built {type(fn).__name__}, not callable")
    return fn


def _is_async(fn: Callable[..., Any]) -> bool:
    # iscoroutinefunction sees through functools.partial; an object's async __call__ needs a look
    call = type(fn).__call__ if not inspect.isroutine(fn) else None
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(call)
