"""Shared fixtures: one tiny model and one Ray instance per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROMPTS_DIR = REPO / "examples" / "data" / "prompts"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """The tiny Llama chat model, built from the bundled corpus with a short training run."""
    from rayalign.models import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("tiny-model"), PROMPTS_DIR, train_steps=40))


@pytest.fixture(scope="session")
def ray_session():
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()
