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


@pytest.fixture
def small_recipe(tmp_path, tiny_model) -> tuple[Path, list[str]]:
    """A quickstart-shaped recipe on the session's tiny model, sized for tests, and its overrides."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""
name: test
languages: [en, de, ru]
policy: {{path: {tiny_model}}}
prompts: {{path: {PROMPTS_DIR}, limit: 4}}
sampling: {{n: 2, temperature: 0.9, max_new_tokens: 12, seed: 7}}
engines: {{count: 1, batch_size: 8, shard_rows: 4, num_cpus: 1}}
""")
    return recipe, []
