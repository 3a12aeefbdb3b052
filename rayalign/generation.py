"""Prompt rows -> per-sample requests -> samples rows. Shared by the actors and direct engine use."""

from __future__ import annotations

import pyarrow as pa

from rayalign.config import SamplingConfig
from rayalign.data.schemas import schema_for
from rayalign.engines import Engine, GenerationRequest, SamplingParams, sample_seed
from rayalign.languages import detect_language


def expand_requests(prompts: pa.Table, sampling: SamplingConfig, iteration: int) -> tuple[list[dict], list[GenerationRequest]]:
    """One request per (prompt row, sample index), each with its own derived seed."""
    rows, requests = [], []
    for prompt in prompts.to_pylist():
        for k in range(sampling.n):
            seed = sample_seed(sampling.seed, iteration, prompt["prompt_id"], prompt["lang"], k)
            rows.append({**prompt, "sample_idx": k, "seed": seed})
            requests.append(GenerationRequest(prompt["messages"], SamplingParams(
                sampling.temperature, sampling.top_p, sampling.max_new_tokens, seed)))
    return rows, requests


def generate_samples(engine: Engine, prompts: pa.Table, sampling: SamplingConfig, iteration: int,
                     policy: str) -> pa.Table:
    """Sample `sampling.n` responses for every prompt row; returns rows in the samples schema."""
    rows, requests = expand_requests(prompts, sampling, iteration)
    for row, completion in zip(rows, engine.generate(requests)):
        row.update(response=completion.text, num_tokens=completion.num_tokens,
                   finish_reason=completion.finish_reason, policy=policy,
                   lang_detected=detect_language(completion.text))
    return pa.Table.from_pylist(rows, schema=schema_for("samples")[1])
