"""Rewards from config: what a reward receives (base), how rewards combine (combine), where
they run (runner), and the shipped rewards (math, qa, format).

Nothing heavy is imported here: a pool worker imports only the reward modules it needs.

    python -m pytest tests/unit/test_rewards.py tests/unit/test_reward_runner.py
"""
