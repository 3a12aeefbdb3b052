"""Prompt rows -> per-sample requests -> samples rows. Shared by the actors and direct engine use. Also the errors of
rows (FailedRowsError) and of actors (ActorsLostError) that fail, which the CLI catches without importing Ray."""

from __future__ import annotations

import re

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
                     policy: str, token_ids: bool = False) -> pa.Table:
    """Sample `sampling.n` responses for every prompt row; returns rows in the samples schema (`token_ids`: plus
    a response_ids column, the generated tokens, which online RL trains on)."""
    rows, requests = expand_requests(prompts, sampling, iteration)
    completions = engine.generate(requests)
    for row, completion in zip(rows, completions):
        row.update(response=completion.text, num_tokens=completion.num_tokens,
                   finish_reason=completion.finish_reason, policy=policy,
                   lang_detected=detect_language(completion.text))
    table = pa.Table.from_pylist(rows, schema=schema_for("samples")[1])
    return with_response_ids(table, [list(c.token_ids) for c in completions]) if token_ids else table


def with_response_ids(table: pa.Table, ids: list[list[int]]) -> pa.Table:
    return table.append_column("response_ids", pa.array(ids, pa.list_(pa.int32())))


class FailedRowsError(RuntimeError):
    """More rows failed by themselves than a stage allows; the message names the count and where they are."""


class ActorsLostError(RuntimeError):
    """Generation or scoring actors died and no actor is left to take their shards, or a shard kept killing them;
    the message gives the cause's last line and how the run resumes."""


def actor_failure(error: BaseException) -> str:
    """The last `SomeError: message` line of a Ray actor error (its text holds the actor's whole traceback)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    named = [line for line in lines if re.match(r"[\w.]+(Error|Exception)\b.*:", line)]
    reason = (named or lines or [type(error).__name__])[-1][:400]
    if "cache blocks" in reason or "KV cache" in reason:
        reason += " (engines.kv_cache_gib sets each vLLM engine's KV cache; on GPUs, gpu_memory_utilization when unset)"
    return reason


RESUME_AFTER_LOST_ACTORS = ("finished shards are kept: fix the cause (or free the resources) and run the same "
                            "command again to resume")


def context_limit(engine) -> int | None:
    """Tokens a prompt plus its response may take, or None when the engine does not say: the model's context, and
    on vLLM one less than max_model_len, since scoring a sequence (prompt_logprobs) also generates one token."""
    llm = getattr(engine, "llm", None)  # vLLM
    if llm is not None:
        limit = getattr(getattr(getattr(llm, "llm_engine", None), "model_config", None), "max_model_len", None)
        return None if limit is None else limit - 1
    config = getattr(getattr(engine, "model", None), "config", None)  # transformers
    return getattr(config, "max_position_embeddings", None)


def error_rows(stage: str, rows: list[dict], reasons: list[str]) -> pa.Table:
    """Rows that failed by themselves, in the errors schema (`sample_idx` null for a whole prompt row)."""
    return pa.Table.from_pylist([{"stage": stage, "prompt_id": r["prompt_id"], "lang": r["lang"],
                                  "sample_idx": r.get("sample_idx"), "reason": reason}
                                 for r, reason in zip(rows, reasons)], schema=schema_for("errors")[1])


def isolate_failures(run, table: pa.Table, stage: str, too_long: list[str | None]) -> tuple[pa.Table, pa.Table]:
    """`run(table) -> table` over the rows of `table` that fit the context (`too_long[i]` is None).

    The batch is tried first; when it raises, each row is run alone and the rows that fail alone are
    left out. Returns (output of the rows that succeeded, in order; their failures in the errors schema).
    """
    keep = [i for i, reason in enumerate(too_long) if reason is None]
    failed = {i: reason for i, reason in enumerate(too_long) if reason is not None}
    try:
        outputs = [run(table.take(keep))] if keep else []
    except Exception:  # noqa: BLE001 - a row-level failure is found by running the rows one at a time
        outputs = []
        for i in keep:
            try:
                outputs.append(run(table.slice(i, 1)))
            except Exception as e:  # noqa: BLE001
                failed[i] = f"{type(e).__name__}: {e}"[:2000]
    order = sorted(failed)
    errors = error_rows(stage, table.take(pa.array(order, pa.int64())).select(
        [c for c in ("prompt_id", "lang", "sample_idx") if c in table.column_names]).to_pylist(),
        [failed[i] for i in order])
    return (pa.concat_tables(outputs) if outputs else None), errors


def generate_isolating(engine: Engine, prompts: pa.Table, sampling: SamplingConfig, iteration: int,
                       policy: str, token_ids: bool = False) -> tuple[pa.Table, pa.Table]:
    """`generate_samples`, with prompt rows that fail by themselves left out: (samples, errors).

    A prompt whose tokens plus max_new_tokens exceed the model's context fails without being tried.
    """
    limit = context_limit(engine)
    too_long = [None] * prompts.num_rows
    if limit is not None:
        for i, messages in enumerate(prompts.column("messages").to_pylist()):
            try:
                tokens = len(engine.encode_prompt(messages))
            except Exception as e:  # noqa: BLE001 - the chat template refuses this row (a role it lacks): the row fails
                too_long[i] = f"the chat template refused the prompt ({type(e).__name__}: {e})"
                continue
            if tokens + sampling.max_new_tokens > limit:
                too_long[i] = (f"prompt of {tokens} tokens + max_new_tokens {sampling.max_new_tokens} exceeds the "
                               f"model's context of {limit} tokens")
    samples, errors = isolate_failures(lambda rows: generate_samples(engine, rows, sampling, iteration, policy,
                                                                     token_ids), prompts, "generate", too_long)
    if samples is None:
        samples = schema_for("samples")[1].empty_table()
        samples = with_response_ids(samples, []) if token_ids else samples
    return samples, errors
