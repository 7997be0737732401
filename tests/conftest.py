"""Shared fixtures: the embedded model, built once per machine and cached (see toolrl/models/tiny.py)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def embedded_base() -> str:
    """The embedded tokenizer + random-init tiny model (no warm-start): fast to build."""
    from toolrl.models.tiny import build_embedded_model

    return str(build_embedded_model(warm_start=False))


@pytest.fixture(scope="session")
def embedded_model() -> str:
    """The warm-started embedded default model, exactly what `python -m toolrl.main` trains."""
    from toolrl.models.tiny import build_embedded_model

    return str(build_embedded_model())
