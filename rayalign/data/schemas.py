"""Arrow schemas of rayalign's datasets. Bump a version when a schema changes incompatibly."""

import pyarrow as pa

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])

PROMPT_FIELDS = [
    pa.field("prompt_id", pa.string(), nullable=False),
    pa.field("lang", pa.string(), nullable=False),
    pa.field("messages", pa.list_(MESSAGE), nullable=False),
    pa.field("reference", pa.string()),  # a reference answer when the source has one
    pa.field("source", pa.string()),
]

SAMPLE_FIELDS = PROMPT_FIELDS + [
    pa.field("sample_idx", pa.int32(), nullable=False),
    pa.field("response", pa.string(), nullable=False),
    pa.field("num_tokens", pa.int32(), nullable=False),  # generated tokens, end-of-turn token included
    pa.field("finish_reason", pa.string(), nullable=False),  # "stop" or "length"
    pa.field("seed", pa.int64(), nullable=False),
    pa.field("policy", pa.string(), nullable=False),
    pa.field("lang_detected", pa.string(), nullable=False),
]

SCORE_FIELDS = SAMPLE_FIELDS + [
    pa.field("score_tokens", pa.int32(), nullable=False),  # response tokens as scored, end-of-turn included
    pa.field("logp_policy", pa.float64(), nullable=False),  # log pi(y|x), native prompt: next DPO's reference
] + [pa.field(name, pa.float64()) for name in (
    "logp_policy_icr",  # log pi_theta(y | G(x)) (or the native prompt for R_m)
    "logp_reward_ref",  # log pi_I(y | G(x))
    "r_msa", "phi", "w", "r_lacomsa", "r_icr", "r_rm", "r_user",
)]
LATENT_COLUMNS = ("h_hub", "h_last")  # pooled states at the hub and language layers, float16

MESSAGE_LIST = pa.list_(MESSAGE)
PAIR_FIELDS = [
    pa.field("prompt", MESSAGE_LIST, nullable=False),
    pa.field("chosen", MESSAGE_LIST, nullable=False),
    pa.field("rejected", MESSAGE_LIST, nullable=False),
    pa.field("prompt_id", pa.string(), nullable=False),
    pa.field("lang", pa.string(), nullable=False),
    pa.field("score_chosen", pa.float64(), nullable=False),
    pa.field("score_rejected", pa.float64(), nullable=False),
    pa.field("ref_logp_chosen", pa.float64()),  # the training reference's summed log-probs
    pa.field("ref_logp_rejected", pa.float64()),
    pa.field("chosen_num_tokens", pa.int32()),
    pa.field("rejected_num_tokens", pa.int32()),
    pa.field("method", pa.string(), nullable=False),
    pa.field("iteration", pa.int32(), nullable=False),
]
KTO_FIELDS = [
    pa.field("prompt", MESSAGE_LIST, nullable=False),
    pa.field("completion", MESSAGE_LIST, nullable=False),
    pa.field("label", pa.bool_(), nullable=False),
    pa.field("prompt_id", pa.string(), nullable=False),
    pa.field("lang", pa.string(), nullable=False),
    pa.field("score", pa.float64(), nullable=False),
    pa.field("ref_logp", pa.float64()),
    pa.field("num_tokens", pa.int32()),
    pa.field("method", pa.string(), nullable=False),
    pa.field("iteration", pa.int32(), nullable=False),
]
DCO_FIELDS = [pa.field("prompt_id", pa.string(), nullable=False)] + [
    pa.field(f"{name}_{side}", MESSAGE_LIST, nullable=False)
    for side in (1, 2) for name in ("prompt", "chosen", "rejected")
] + [pa.field(f"lang_{side}", pa.string(), nullable=False) for side in (1, 2)] + [
    pa.field(f"ref_logp_{name}_{side}", pa.float64(), nullable=False)
    for side in (1, 2) for name in ("chosen", "rejected")
] + [pa.field("gamma_12", pa.float64(), nullable=False), pa.field("gamma_21", pa.float64(), nullable=False),
     pa.field("method", pa.string(), nullable=False), pa.field("iteration", pa.int32(), nullable=False)]
CANDIDATE_SCORE_FIELDS = [
    pa.field("prompt_id", pa.string(), nullable=False),
    pa.field("lang", pa.string(), nullable=False),
    pa.field("messages", MESSAGE_LIST, nullable=False),
    pa.field("candidate_idx", pa.int32(), nullable=False),
    pa.field("candidate", pa.string(), nullable=False),
    pa.field("gold", pa.int32(), nullable=False),
    pa.field("logp_ref", pa.float64(), nullable=False),
    pa.field("num_tokens", pa.int32(), nullable=False),
]

ERROR_FIELDS = [  # rows that failed by themselves in a stage and were left out of its output
    pa.field("stage", pa.string(), nullable=False),  # "generate" or "score"
    pa.field("prompt_id", pa.string(), nullable=False),
    pa.field("lang", pa.string(), nullable=False),
    pa.field("sample_idx", pa.int32()),  # null when the whole prompt row failed (generation)
    pa.field("reason", pa.string(), nullable=False),
]

ROLLOUT_FIELDS = SAMPLE_FIELDS + [  # online RL: one step's samples with their reward and advantage
    pa.field("step", pa.int32(), nullable=False),
    pa.field("reward", pa.float64(), nullable=False),
    pa.field("advantage", pa.float64(), nullable=False),
]

EVAL_FIELDS = [  # `rayalign eval`: one row per (metric, statistic, language or language pair, layer)
    pa.field("policy", pa.string(), nullable=False),  # the evaluated checkpoint (path or run-relative name)
    pa.field("metric", pa.string(), nullable=False),  # fidelity, response_tokens, silhouette, rankc, accuracy,
    # judge_win_rate, or a reward column of scores (r_lacomsa, r_msa, r_icr, ...)
    pa.field("stat", pa.string(), nullable=False),  # share, mean, std, min, p25, p50, p75, max, score
    pa.field("lang", pa.string(), nullable=False),  # a language code, or "all" for the whole prompt set
    pa.field("other_lang", pa.string()),  # RankC: the second language of the pair
    pa.field("layer", pa.int32()),  # silhouette: the hidden_states index
    pa.field("value", pa.float64(), nullable=False),
    pa.field("count", pa.int64(), nullable=False),  # samples, queries or prompts behind the value
]

SCHEMA_VERSIONS = {"prompts": 1, "samples": 1, "scores": 1, "pairs": 1, "kto": 1, "dco": 1, "candidate_scores": 1,
                   "errors": 1, "rollouts": 1, "eval": 1}


def schema_for(name: str, params: dict | None = None) -> tuple[int, pa.Schema]:
    """(version, schema) of a named dataset schema; `scores` takes {"latent_dim": H} (0 = no latents)."""
    if name not in SCHEMA_VERSIONS:
        raise ValueError(f"unknown dataset schema {name!r} (known: {', '.join(SCHEMA_VERSIONS)})")
    params = params or {}
    fields = {"prompts": PROMPT_FIELDS, "samples": SAMPLE_FIELDS, "scores": SCORE_FIELDS, "pairs": PAIR_FIELDS,
              "kto": KTO_FIELDS, "dco": DCO_FIELDS, "candidate_scores": CANDIDATE_SCORE_FIELDS, "errors": ERROR_FIELDS,
              "rollouts": ROLLOUT_FIELDS, "eval": EVAL_FIELDS}[name]
    if name == "scores" and params.get("latent_dim"):
        dim = int(params["latent_dim"])
        fields = fields + [pa.field(c, pa.list_(pa.float16(), dim)) for c in LATENT_COLUMNS]
    return SCHEMA_VERSIONS[name], pa.schema(fields)
