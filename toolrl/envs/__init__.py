"""Example environments for the environment rollout protocol (toolrl/rollout/protocols/environment.py)."""
