"""Soak (opt-in, `-m soak`): many generation shards on 3 actors while a thread kills random actors end in a
complete, valid dataset equal to an undisturbed run's (issue 7)."""

from __future__ import annotations

import random
import threading
import time

import pyarrow as pa
import pytest
import ray
from click.testing import CliRunner

from conftest import PROMPTS_DIR
from rayalign.actors.generator import GenerationGroup
from rayalign.actors.pool import split_shards
from rayalign.cli import main
from rayalign.config import load_config
from rayalign.data.prompts import load_prompts
from rayalign.data.store import DatasetWriter, read_dataset

pytestmark = pytest.mark.soak

SHARDS, ACTORS, N = 40, 3, 2


@pytest.fixture(scope="module")
def setup(tiny_model, ray_session):
    cfg = load_config(None, ["languages=[en,de]", f"sampling.n={N}", "sampling.max_new_tokens=16",
                             "engines.batch_size=8", "engines.shard_rows=1", f"policy.path={tiny_model}"])
    prompts = load_prompts(PROMPTS_DIR, cfg.languages, limit=SHARDS // 2)  # 40 rows, one shard each
    return cfg, prompts, tiny_model


def generate(setup, out_dir, count: int, killer=None):
    """Run the generation group into a dataset at `out_dir`; `killer(group, written)` runs in a thread."""
    cfg, prompts, model = setup
    cfg.engines.count = count
    shards = split_shards(prompts, cfg.engines.shard_rows)
    assert len(shards) == SHARDS
    writer = DatasetWriter(out_dir, "samples", config_hash=cfg.config_hash(), languages=cfg.languages)
    written: list[int] = []

    def on_shard(index: int, table: pa.Table) -> None:
        writer.write_shard(index, table)
        written.append(index)

    group = GenerationGroup(model, cfg.policy, cfg.engines)
    thread = threading.Thread(target=killer, args=(group, written), daemon=True) if killer else None
    try:
        if thread:
            thread.start()
        stats = group.run(shards, cfg.sampling, 1, "tiny", on_shard)
    finally:
        if thread:
            thread.join(timeout=60)
        group.shutdown()
    writer.finalize(expected_shards=len(shards))
    return stats


@pytest.fixture(scope="module")
def undisturbed(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("soak") / "undisturbed"
    generate(setup, out, ACTORS)
    return read_dataset(out, "samples")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_actor_kills_end_in_the_undisturbed_dataset(setup, undisturbed, tmp_path, seed):
    rng = random.Random(seed)
    kills: list[tuple[int, int]] = []  # (actor, shards written when it was killed)

    def killer(group, written):
        # kill ACTORS - 1 actors at random moments, one at a time; at least one stays alive
        for target in sorted(rng.sample(range(4, SHARDS - 6), ACTORS - 1)):
            while len(written) < target:
                if len(written) >= SHARDS:
                    return
                time.sleep(0.005)
            time.sleep(rng.uniform(0, 0.2))
            candidates = [a for a in range(len(group.actors)) if a not in {k for k, _ in kills}]
            if len(candidates) <= 1:
                return
            victim = rng.choice(candidates)
            ray.kill(group.actors[victim], no_restart=True)
            kills.append((victim, len(written)))

    out = tmp_path / "samples"
    stats = generate(setup, out, ACTORS, killer)
    assert len(kills) == ACTORS - 1, kills
    assert stats.retries >= 1  # a killed actor had shards in flight: they went to the others

    result = CliRunner().invoke(main, ["validate", str(out)], catch_exceptions=False)
    assert result.exit_code == 0 and f"{SHARDS * N} rows" in result.output, result.output
    table = read_dataset(out, "samples")
    counts: dict[tuple[str, str], int] = {}
    for row in table.select(["prompt_id", "lang"]).to_pylist():
        counts[(row["prompt_id"], row["lang"])] = counts.get((row["prompt_id"], row["lang"]), 0) + 1
    assert len(counts) == SHARDS and set(counts.values()) == {N}
    assert table.equals(undisturbed)
