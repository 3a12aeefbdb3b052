"""vLLM engine: HFEngine's interface (rayalign.engines.Engine) on vLLM, for generation on GPUs.

Prompts are token ids from the same chat-template call as HFEngine and completions are decoded with the same
tokenizer, so both engines see and return the same tokens and text. Each request is one vLLM request (n=1) with its
own SamplingParams and seed. score() sums vLLM's prompt log-probs over the response tokens; pooled hidden states
are not available here (latent rewards score with the hf engine).
"""

from __future__ import annotations

import dataclasses
import gc
import os

import torch
import vllm

from rayalign.engines import Completion, GenerationRequest, ScoreRequest, ScoreResult
from rayalign.models import encode_response, load_tokenizer

UPDATE_CHUNK_BYTES = 1 << 30  # update_weights sends the tensors to the workers in RPCs of about this size


class WorkerWeights:
    """Mixed into every vLLM worker (worker_extension_cls), so collective_rpc can load tensors into its shard."""

    def rayalign_load_weights(self, named_tensors: list[tuple[str, torch.Tensor]]) -> None:
        self.model_runner.model.load_weights(weights=named_tensors)  # HF names; vLLM shards and fuses them


def eos_token_ids(model_path: str, tokenizer, trust_remote_code: bool = False) -> list[int]:
    """The end-of-turn ids HFEngine stops at: the generation config's eos ids and the tokenizer's eos token."""
    from transformers import GenerationConfig

    try:
        eos = GenerationConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code).eos_token_id
    except OSError:  # no generation_config.json
        eos = None
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    return sorted(set(eos) | {tokenizer.eos_token_id})


class VLLMEngine:
    def __init__(self, model_path: str, *, dtype: str = "auto", tensor_parallel_size: int = 1,
                 trust_remote_code: bool = False, gpu_memory_utilization: float = 0.9,
                 max_model_len: int | None = None, seed: int = 0):
        self.trust_remote_code = trust_remote_code
        self.options = dict(dtype=dtype, tensor_parallel_size=tensor_parallel_size, trust_remote_code=trust_remote_code,
                            gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len, seed=seed)
        if tensor_parallel_size > 1:
            # One Ray worker per GPU bundle of this actor's placement group (vLLM picks the group up with
            # ray.util.get_current_placement_group). This process holds no GPU, and Ray may have set
            # CUDA_VISIBLE_DEVICES="" here, which would hide the GPUs from vLLM's platform check.
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
            self.options["distributed_executor_backend"] = "ray"
        if "worker_extension_cls" in {f.name for f in dataclasses.fields(vllm.EngineArgs)}:  # vllm >= 0.8.3
            self.options["worker_extension_cls"] = f"{__name__}.{WorkerWeights.__qualname__}"
        self.llm = None
        self._start(model_path)

    def _start(self, model_path: str) -> None:
        self.model_path = model_path
        self.tokenizer = load_tokenizer(model_path, self.trust_remote_code)
        self.eos_ids = eos_token_ids(model_path, self.tokenizer, self.trust_remote_code)
        self.llm = vllm.LLM(model=model_path, **self.options)

    def encode_prompt(self, messages: list[dict]) -> list[int]:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                  return_dict=False)

    def generate(self, requests: list[GenerationRequest]) -> list[Completion]:
        if not requests:
            return []
        prompts = [{"prompt_token_ids": self.encode_prompt(r.messages)} for r in requests]
        params = [vllm.SamplingParams(n=1, temperature=r.params.temperature, top_p=r.params.top_p,
                                      max_tokens=r.params.max_new_tokens, seed=r.params.seed,
                                      stop_token_ids=list(self.eos_ids))
                  for r in requests]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)  # in the order of `prompts`
        eos = set(self.eos_ids)
        completions = []
        for out in outputs:
            tokens = list(out.outputs[0].token_ids)  # the stop token is kept in token_ids
            end = next((j for j, tok in enumerate(tokens) if tok in eos), None)
            text = self.tokenizer.decode(tokens if end is None else tokens[:end], skip_special_tokens=True)
            completions.append(Completion(text=text, num_tokens=len(tokens) if end is None else end + 1,
                                          finish_reason="length" if end is None else "stop"))
        return completions

    def score(self, requests: list[ScoreRequest], layers: list[int] = ()) -> list[ScoreResult]:
        """Teacher-forced log-prob of each response under its chat prompt (end-of-turn token included), in order.

        vLLM returns, for prompt position i > 0, the log-prob of token i given tokens < i; the response's positions
        are summed. pooled is always {}.
        """
        if len(layers):
            raise NotImplementedError(f"VLLMEngine.score: pooled hidden states (layers={list(layers)}) need the hf "
                                      "engine; run the scoring actors with engines.backend=hf for latent rewards")
        encoded = [encode_response(self.tokenizer, r.messages, r.response) for r in requests]
        if not encoded:
            return []
        params = vllm.SamplingParams(n=1, max_tokens=1, temperature=1.0, prompt_logprobs=0)
        outputs = self.llm.generate([{"prompt_token_ids": p + r} for p, r in encoded], params, use_tqdm=False)
        results = []
        for (prompt, response), out in zip(encoded, outputs):
            ids = prompt + response
            entries = out.prompt_logprobs  # [None, {token_id: Logprob}, ...], entry i for ids[i]
            logp = sum(float(entries[i][ids[i]].logprob) for i in range(len(prompt), len(ids)))
            results.append(ScoreResult(logp=logp, num_tokens=len(response), pooled={}))
        return results

    # ---- weights ------------------------------------------------------------------------------------------------

    def load_weights(self, path: str) -> None:
        """Serve the HF checkpoint at `path` from now on (the next iteration's policy): rebuilds the vLLM engine."""
        self.shutdown()
        self._start(path)

    def update_weights(self, named_tensors) -> None:
        """Load HF-named parameters (a dict or (name, tensor) pairs; numpy or torch) into the served model in place,
        for online training."""
        if "worker_extension_cls" not in self.options:
            raise RuntimeError(f"VLLMEngine.update_weights needs vllm>=0.8.3 (worker_extension_cls); this is "
                               f"vllm {getattr(vllm, '__version__', '?')}. Save a checkpoint and call load_weights.")
        batch, size = [], 0
        pairs = named_tensors.items() if isinstance(named_tensors, dict) else named_tensors
        for name, tensor in pairs:
            tensor = torch.as_tensor(tensor)
            batch.append((name, tensor.detach().cpu()))  # CPU tensors serialise to worker processes and Ray workers
            size += tensor.numel() * tensor.element_size()
            if size >= UPDATE_CHUNK_BYTES:
                self.llm.collective_rpc("rayalign_load_weights", args=(batch,))
                batch, size = [], 0
        if batch:
            self.llm.collective_rpc("rayalign_load_weights", args=(batch,))
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights

    def shutdown(self) -> None:
        """Stop the engine and free its GPU memory."""
        if self.llm is None:
            return
        engine_core = getattr(self.llm.llm_engine, "engine_core", None)  # V1: a client of the engine core
        if hasattr(engine_core, "shutdown"):
            engine_core.shutdown()
        self.llm = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
