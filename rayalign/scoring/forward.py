"""Samples rows -> teacher-forced quantities (log-probs, token counts, pooled states) per model.

Shared by the scoring actors and direct engine use. Each ForwardSpec is one pass of one model over
every row: a log-prob column and, optionally, pooled states at some layers from the same pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from rayalign.engines import ScoreRequest


@dataclass(frozen=True)
class ForwardSpec:
    role: str  # which loaded model: "policy", "reward_reference", "dco_reference", ...
    prompt_column: str  # "messages" (native prompt) or "messages_cross_lingual" (G(x))
    logp_column: str
    layers: tuple[tuple[str, int], ...] = ()  # (output column, hidden_states index)
    tokens_column: str | None = None
    # also <logp_column>_end_of_turn / end_of_turn_tokens and <logp_column>_prompt / prompt_tokens (candidate scoring)
    likelihood_parts: bool = False
    response_column: str = "response"  # the scored text: "response", or "response_anchor" (ICR's R_t)


def latent_array(values: list[np.ndarray]) -> pa.FixedSizeListArray:
    """(N, H) pooled states as a fixed_size_list<float16>[H] column."""
    matrix = np.asarray(values, dtype=np.float16)
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), matrix.shape[1])


def latent_matrix(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A fixed_size_list<float16>[H] column back to an (N, H) float32 matrix."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    return column.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(column), -1)


def forward_rows(engines: dict, table: pa.Table, specs: list[ForwardSpec], reward_model: str | None = None) -> pa.Table:
    """Append each spec's columns (and `r_rm` when a reward model is loaded) to `table`."""
    rows = table.select([c for c in table.column_names if c.startswith(("messages", "response"))]).to_pylist()
    for spec in specs:
        requests = [ScoreRequest(r[spec.prompt_column], r[spec.response_column], spec.likelihood_parts) for r in rows]
        results = engines[spec.role].score(requests, [layer for _, layer in spec.layers])
        table = table.append_column(spec.logp_column, pa.array([r.logp for r in results], pa.float64()))
        if spec.tokens_column:
            table = table.append_column(spec.tokens_column, pa.array([r.num_tokens for r in results], pa.int32()))
        if spec.likelihood_parts:
            for column, values, kind in [
                    (f"{spec.logp_column}_end_of_turn", [r.end_of_turn_logp for r in results], pa.float64()),
                    ("end_of_turn_tokens", [r.end_of_turn_tokens for r in results], pa.int32()),
                    (f"{spec.logp_column}_prompt", [r.prompt_logp for r in results], pa.float64()),
                    ("prompt_tokens", [r.prompt_tokens for r in results], pa.int32())]:
                table = table.append_column(column, pa.array(values, kind))
        for column, layer in spec.layers:
            table = table.append_column(column, latent_array([r.pooled[layer] for r in results]))
    if reward_model:
        scores = engines[reward_model].score([r["messages"] for r in rows], [r["response"] for r in rows])
        table = table.append_column("r_rm", pa.array(scores, pa.float64()))
    return table


def forward_rows_isolating(engines: dict, table: pa.Table, specs: list[ForwardSpec],
                           reward_model: str | None = None) -> tuple[pa.Table, pa.Table]:
    """`forward_rows`, with samples that fail by themselves left out: (scored rows, errors).

    A sample whose prompt and response exceed a scoring model's context fails without being tried. When every
    row fails, the result is the empty input table (without the scored columns).
    """
    from rayalign.generation import context_limit, isolate_failures
    from rayalign.models import encode_response

    too_long: list[str | None] = [None] * table.num_rows
    rows = table.select([c for c in table.column_names if c.startswith(("messages", "response"))]).to_pylist()
    for spec in specs:
        engine = engines[spec.role]
        limit = context_limit(engine)
        if limit is None:
            continue
        for i, row in enumerate(rows):
            if too_long[i] is None:
                prompt, response = encode_response(engine.tokenizer, row[spec.prompt_column],
                                                   row[spec.response_column])
                if len(prompt) + len(response) > limit:
                    too_long[i] = (f"{spec.role} ({spec.prompt_column}): prompt of {len(prompt)} + response of "
                                   f"{len(response)} tokens exceed the model's context of {limit} tokens")
    scored, errors = isolate_failures(lambda part: forward_rows(engines, part, specs, reward_model), table, "score",
                                      too_long)
    return (scored if scored is not None else table.slice(0, 0)), errors  # no rows left: no columns added
