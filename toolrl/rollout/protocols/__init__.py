"""Rollout protocols: how a trajectory advances between sampled segments (see base.py).

chat.ChatToolTurns, inline.InlineTags, environment.EnvironmentTurns; chosen with `protocol=`.
"""
