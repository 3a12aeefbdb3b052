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

SCHEMAS: dict[str, tuple[int, pa.Schema]] = {
    "prompts": (1, pa.schema(PROMPT_FIELDS)),
    "samples": (1, pa.schema(SAMPLE_FIELDS)),
}


def schema_for(name: str) -> tuple[int, pa.Schema]:
    """(version, schema) of a named dataset schema."""
    try:
        return SCHEMAS[name]
    except KeyError:
        raise ValueError(f"unknown dataset schema {name!r} (known: {', '.join(SCHEMAS)})") from None
