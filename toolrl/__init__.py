"""toolrl: reinforcement learning for LLMs that call tools in the middle of their rollouts."""

__version__ = "0.1.0"
