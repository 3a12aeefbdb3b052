"""Model sizes for planning: parameters, layers and hidden size, read from a local checkpoint's config, the Hub
cache, or the shipped table (cluster/models.yaml); nothing is downloaded."""

from __future__ import annotations

import copy
import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from rayalign.cluster.spec import GB

MODELS_FILE = Path(__file__).parent / "models.yaml"
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def read_table(path: Path) -> dict:
    """A shipped YAML table (models, throughput), parsed once per version of the file; the caller's copy."""
    return copy.deepcopy(_parsed(path, path.stat().st_mtime_ns))


@functools.lru_cache(maxsize=8)
def _parsed(path: Path, _version: int) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


class PlanError(ValueError):
    """A recipe that does not fit a cluster: the reason and what to change."""

    def __init__(self, reason: str, suggestion: str = ""):
        self.reason, self.suggestion = reason, suggestion
        super().__init__(f"{reason}; {suggestion}" if suggestion else reason)


@dataclass(frozen=True)
class ModelInfo:
    """What the planner needs of a model, from its config.json (no weights are loaded)."""

    name: str
    parameters: int
    num_layers: int
    hidden_size: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    dtype_bytes: int  # of the checkpoint as published
    num_heads: int = 0  # attention (query) heads; 0 = unknown

    def tensor_parallel_sizes(self, most: int) -> list[int]:
        """The tensor-parallel sizes up to `most` that vLLM accepts: they divide the attention heads, and the KV
        heads divide by them or they by the KV heads (then replicated)."""
        return [tp for tp in range(1, most + 1) if not self.num_heads or self.num_heads % tp == 0 and
                (self.num_kv_heads % tp == 0 if self.num_kv_heads >= tp else tp % self.num_kv_heads == 0)]

    @classmethod
    def from_hf_config(cls, name: str, config: dict, parameters: int | None = None) -> ModelInfo:
        required = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
        missing = [key for key in required if key not in config]
        if missing:
            raise PlanError(f"{name}: config.json has no {missing[0]} (the planner reads Llama-style decoder configs)",
                            "add the model's sizes to cluster/models.yaml")
        heads = config["num_attention_heads"]
        return cls(name=name, parameters=int(parameters or count_parameters(config)),
                   num_layers=config["num_hidden_layers"], hidden_size=config["hidden_size"],
                   num_kv_heads=config.get("num_key_value_heads") or heads,
                   head_dim=config.get("head_dim") or config["hidden_size"] // heads,
                   vocab_size=config["vocab_size"], dtype_bytes=DTYPE_BYTES.get(config.get("torch_dtype"), 4),
                   num_heads=heads)

    def weights_gb(self, dtype_bytes: int) -> float:
        return self.parameters * dtype_bytes / GB

    def kv_bytes_per_token(self, dtype_bytes: int, tensor_parallel_size: int = 1) -> int:
        """K and V of every layer for one token on one GPU; KV heads are split over the tensor-parallel ranks
        (replicated once there are more ranks than heads)."""
        heads_per_gpu = max(1, self.num_kv_heads // tensor_parallel_size)
        return 2 * self.num_layers * heads_per_gpu * self.head_dim * dtype_bytes


def count_parameters(config: dict) -> int:
    """Parameters of a Llama-style decoder (Llama, Mistral, Qwen2) from its config.json."""
    hidden, layers, vocab = config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    attention = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim  # q, o; k, v
    if config.get("attention_bias") or config.get("model_type") == "qwen2":
        attention += (heads + 2 * kv_heads) * head_dim  # q, k, v biases
    per_layer = attention + 3 * hidden * config["intermediate_size"] + 2 * hidden  # gate/up/down; two RMSNorms
    embeddings = vocab * hidden * (1 if config.get("tie_word_embeddings") else 2)  # input and output
    return layers * per_layer + embeddings + hidden  # + the final norm


def _safetensors_parameters(model_dir: Path) -> int | None:
    """The exact parameter count from the safetensors headers (a few KB read per file, no weights)."""
    files = sorted(model_dir.glob("*.safetensors"))
    total = 0
    for file in files:
        with open(file, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        total += sum(math.prod(t["shape"]) for key, t in header.items() if key != "__metadata__")
    return total or None


def _directory_model_info(name: str, model_dir: Path) -> ModelInfo:
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise PlanError(f"{model_dir}: not a model directory (no config.json)", "point the recipe at a model directory")
    return ModelInfo.from_hf_config(name, json.loads(config_file.read_text()), _safetensors_parameters(model_dir))


def _tiny_model_info(path: str) -> ModelInfo:
    """The tiny offline model: its cached directory when built, else the config it would be built with."""
    # rayalign.models has no public "where is the tiny model cached" helper yet; these mirror ensure_tiny_model
    from rayalign.models import TINY_DEFAULTS, _tiny_overrides, cache_dir, tiny_corpus_dir, tiny_model_key

    params = {**TINY_DEFAULTS, **_tiny_overrides(path)}
    cached = cache_dir() / "models" / f"tiny-multilingual-{tiny_model_key(tiny_corpus_dir(), params)}"
    if (cached / "config.json").is_file():
        return _directory_model_info(path, cached)
    config = {key: params[key] for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                           "num_attention_heads", "num_key_value_heads")}
    return ModelInfo.from_hf_config(path, {**config, "tie_word_embeddings": True, "torch_dtype": "float32"})


def _hub_cache_config(name: str) -> dict | None:
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(name, "config.json")
    except Exception:  # not a valid repo id, no huggingface_hub: not in the cache
        return None
    return json.loads(Path(found).read_text()) if isinstance(found, str) else None


def model_info(path: str) -> ModelInfo:
    """Sizes of the model a recipe names: a local directory's config.json and safetensors headers, the tiny
    offline model (never built here), cluster/models.yaml by Hugging Face name, or the local hub cache."""
    from rayalign.config import is_tiny_model

    if is_tiny_model(path):
        return _tiny_model_info(path)
    local = Path(path).expanduser()
    if local.is_dir():
        return _directory_model_info(path, local)
    known = read_table(MODELS_FILE)
    if path in known:
        return ModelInfo.from_hf_config(path, known[path], known[path].get("parameters"))
    cached = _hub_cache_config(path)
    if cached is not None:
        return ModelInfo.from_hf_config(path, cached)
    raise PlanError(f"{path}: unknown model size (not a local directory, not in cluster/models.yaml, not in the "
                    "Hugging Face cache)", f"download it, point the recipe at its directory, or add its config.json "
                    f"sizes to {MODELS_FILE}")
