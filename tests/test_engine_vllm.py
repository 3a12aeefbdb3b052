"""VLLMEngine (rayalign/engines/vllm.py).

Two tiers. The `gpu` tests run the real vLLM on the tiny model and compare it with HFEngine on the same GPU; they
skip without CUDA or vllm. vLLM needs a GPU, so the other tests replace the `vllm` module with a small fake that
records what the engine asks for and answers with objects shaped like vLLM's RequestOutput: they check our side of
the mapping (chat-templated prompt ids, per-request sampling parameters, finish reasons, token counts, which prompt
log-probs are summed, the weight-update RPCs) with the real tiny tokenizer, not vLLM itself.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import shutil
import sys
import time
import types
from types import SimpleNamespace

import pytest
import torch

from rayalign.engines import GenerationRequest, SamplingParams, ScoreRequest

MODULE = "rayalign.engines.vllm"
CHATS = [[{"role": "user", "content": "What is the capital of France?"}],
         [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "¿Qué hora es?"}],
         [{"role": "user", "content": "Wie geht es dir?"}]]


# ---- the fake vllm module ---------------------------------------------------------------------------------------

class FakeLLM:
    """Records its options and every call; `respond(prompt_ids, params)` makes each output."""

    def __init__(self, fake, model, **options):
        self.fake, self.model, self.options = fake, model, options
        self.calls, self.rpcs, self.prefix_resets = [], [], 0
        self.llm_engine = SimpleNamespace(engine_core=SimpleNamespace(shutdown=lambda: fake.shutdowns.append(model)))
        fake.llms.append(self)

    def generate(self, prompts, sampling_params, use_tqdm=True):
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        self.calls.append((prompts, params))
        return [self.fake.respond(p["prompt_token_ids"], sp) for p, sp in zip(prompts, params)]

    def collective_rpc(self, method, args=(), kwargs=None):
        self.rpcs.append((method, args))
        return [None]

    def reset_prefix_cache(self):
        self.prefix_resets += 1


def make_fake_vllm(with_extension: bool = True):
    fake = types.ModuleType("vllm")
    fake.__version__ = "0.0.fake"
    fake.llms, fake.shutdowns, fake.respond = [], [], None
    fake.LLM = lambda model, **options: FakeLLM(fake, model, **options)
    fake.SamplingParams = lambda **kw: SimpleNamespace(**kw)
    fields = {"model": dataclasses.field(default="")}
    if with_extension:
        fields["worker_extension_cls"] = dataclasses.field(default="")
    fake.EngineArgs = dataclasses.make_dataclass("EngineArgs", [(k, str, v) for k, v in fields.items()])
    return fake


@pytest.fixture
def import_engine(monkeypatch):
    """import_engine(fake) -> rayalign.engines.vllm imported against `fake`; the real import state comes back after."""
    import rayalign.engines

    def load(fake):
        monkeypatch.setitem(sys.modules, "vllm", fake)
        monkeypatch.delitem(sys.modules, MODULE, raising=False)
        return importlib.import_module(MODULE)

    yield load
    sys.modules.pop(MODULE, None)  # before monkeypatch restores what was there
    rayalign.engines.__dict__.pop("vllm", None)


@pytest.fixture
def fake_vllm(import_engine):
    fake = make_fake_vllm()
    return fake, import_engine(fake)


def output(token_ids, finish_reason, prompt_logprobs=None):
    return SimpleNamespace(outputs=[SimpleNamespace(token_ids=tuple(token_ids), text="<vllm text, unused>",
                                                    finish_reason=finish_reason)],
                           prompt_logprobs=prompt_logprobs)


def test_generate_maps_requests_and_outputs(fake_vllm, tiny_model):
    from rayalign.engines.hf import HFEngine

    fake, mod = fake_vllm
    engine = mod.VLLMEngine(tiny_model, dtype="bfloat16", gpu_memory_utilization=0.5, seed=7)
    llm = fake.llms[-1]
    assert llm.model == tiny_model
    assert llm.options["dtype"] == "bfloat16" and llm.options["gpu_memory_utilization"] == 0.5
    assert llm.options["seed"] == 7 and "distributed_executor_backend" not in llm.options

    tok = engine.tokenizer
    eos = tok.eos_token_id
    words = tok("hello world again", add_special_tokens=False)["input_ids"]
    by_seed = {11: (words[:2] + [eos], "stop"), 12: (words + words, "length"), 13: ([eos], "stop")}
    fake.respond = lambda ids, sp: output(*by_seed[sp.seed])
    requests = [GenerationRequest(CHATS[0], SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=16, seed=11)),
                GenerationRequest(CHATS[1], SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=2 * len(words),
                                                           seed=12)),
                GenerationRequest(CHATS[2], SamplingParams(temperature=0.0, top_p=0.5, max_new_tokens=8, seed=13))]
    completions = engine.generate(requests)

    prompts, params = llm.calls[-1]
    hf = HFEngine(tiny_model, dtype="float32", device="cpu")
    assert [p["prompt_token_ids"] for p in prompts] == [hf.encode_prompt(c) for c in CHATS]
    for r, sp in zip(requests, params):
        assert (sp.n, sp.temperature, sp.top_p, sp.max_tokens, sp.seed) == \
            (1, r.params.temperature, r.params.top_p, r.params.max_new_tokens, r.params.seed)
        assert sp.stop_token_ids == hf.eos_ids
    assert [c.finish_reason for c in completions] == ["stop", "length", "stop"]
    assert [c.num_tokens for c in completions] == [3, 2 * len(words), 1]  # the end-of-turn token counts
    assert completions[0].text == tok.decode(words[:2], skip_special_tokens=True)
    assert completions[1].text == tok.decode(words + words, skip_special_tokens=True)
    assert completions[2].text == ""
    assert engine.generate([]) == []


def test_score_sums_exactly_the_response_positions(fake_vllm, tiny_model):
    fake, mod = fake_vllm
    engine = mod.VLLMEngine(tiny_model)
    llm = fake.llms[-1]

    def respond(ids, sp):
        # position i: log-prob -(i + 1) / 100 for the real token, and a decoy entry for another token
        entries = [None] + [{ids[i]: SimpleNamespace(logprob=-(i + 1) / 100),
                             -1: SimpleNamespace(logprob=-1000.0)} for i in range(1, len(ids))]
        return output([0], "length", entries)

    fake.respond = respond
    requests = [ScoreRequest(CHATS[0], "Paris is the capital."), ScoreRequest(CHATS[1], "")]
    results = engine.score(requests)

    (prompts, params), = llm.calls
    assert all(sp.max_tokens == 1 and sp.prompt_logprobs == 0 for sp in params)
    tok = engine.tokenizer
    for request, sent, result in zip(requests, prompts, results):
        p = len(tok.apply_chat_template(request.messages, add_generation_prompt=True, tokenize=True,
                                        return_dict=False))
        r = len(tok(request.response, add_special_tokens=False)["input_ids"]) + 1  # + end-of-turn
        assert sent["prompt_token_ids"][-1] == tok.eos_token_id and len(sent["prompt_token_ids"]) == p + r
        # sum of -(i + 1) / 100 over positions p .. p + r - 1 = -(r * (2p + r + 1) / 2) / 100
        assert result.logp == pytest.approx(-(r * (2 * p + r + 1) / 2) / 100, abs=1e-12)
        assert result.num_tokens == r and result.pooled == {}
    assert results[1].num_tokens == 1  # an empty response still scores its end-of-turn token
    assert engine.score([]) == []
    with pytest.raises(NotImplementedError, match="hf engine"):
        engine.score(requests, layers=[2])


def test_tensor_parallel_uses_the_ray_executor(fake_vllm, tiny_model, monkeypatch):
    fake, mod = fake_vllm
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # what Ray sets in an actor that holds no GPU
    mod.VLLMEngine(tiny_model, tensor_parallel_size=2)
    options = fake.llms[-1].options
    assert options["tensor_parallel_size"] == 2 and options["distributed_executor_backend"] == "ray"
    assert "CUDA_VISIBLE_DEVICES" not in os.environ  # monkeypatch puts it back afterwards


def test_update_weights_sends_chunks_to_the_worker_extension(fake_vllm, tiny_model, monkeypatch):
    fake, mod = fake_vllm
    engine = mod.VLLMEngine(tiny_model)
    llm = fake.llms[-1]
    module, _, cls = llm.options["worker_extension_cls"].rpartition(".")
    assert module == MODULE and getattr(sys.modules[module], cls) is mod.WorkerWeights

    monkeypatch.setattr(mod, "UPDATE_CHUNK_BYTES", 64)
    tensors = [("a.weight", torch.ones(4, 4)), ("b.weight", torch.zeros(2)), ("c.weight", torch.full((20,), 2.0))]
    engine.update_weights(iter(tensors))
    assert [m for m, _ in llm.rpcs] == ["rayalign_load_weights"] * 2  # 64 bytes reached after a, then the rest
    sent = [name_tensor for _, (batch,) in llm.rpcs for name_tensor in batch]
    assert [n for n, _ in sent] == ["a.weight", "b.weight", "c.weight"]
    assert all(torch.equal(t, want) for (_, t), (_, want) in zip(sent, tensors))
    assert llm.prefix_resets == 1

    # what each worker runs for the RPC
    loaded = []
    model = SimpleNamespace(load_weights=lambda weights: loaded.extend(weights))
    worker = SimpleNamespace(model_runner=SimpleNamespace(model=model))
    mod.WorkerWeights.rayalign_load_weights(worker, sent)
    assert [n for n, _ in loaded] == ["a.weight", "b.weight", "c.weight"]


def test_update_weights_without_worker_extension_says_so(import_engine, tiny_model):
    fake = make_fake_vllm(with_extension=False)
    engine = import_engine(fake).VLLMEngine(tiny_model)
    assert "worker_extension_cls" not in fake.llms[-1].options
    with pytest.raises(RuntimeError, match="vllm>=0.8.3"):
        engine.update_weights([("a", torch.ones(1))])


def test_create_engine_without_vllm_names_the_extra(import_engine, tiny_model):
    from rayalign.engines import create_engine

    with pytest.raises(ImportError):
        import_engine(None)  # sys.modules["vllm"] = None: `import vllm` raises ImportError
    with pytest.raises(RuntimeError, match=r"rayalign\[gpu\]"):
        create_engine("vllm", tiny_model)


def test_load_weights_rebuilds_the_engine_on_the_new_checkpoint(fake_vllm, tiny_model, tmp_path):
    fake, mod = fake_vllm
    engine = mod.VLLMEngine(tiny_model, gpu_memory_utilization=0.4)
    policy = shutil.copytree(tiny_model, tmp_path / "policy")
    engine.load_weights(str(policy))
    assert fake.shutdowns == [tiny_model]
    assert fake.llms[-1].model == str(policy) and engine.model_path == str(policy)
    assert fake.llms[-1].options == fake.llms[0].options
    engine.shutdown()
    engine.shutdown()  # a second shutdown does nothing
    assert fake.shutdowns == [tiny_model, str(policy)]


# ---- the real vLLM on a GPU ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gpu_model(request) -> str:
    """The tiny model, once vllm and CUDA are known to be there (so a skip does not build it)."""
    pytest.importorskip("vllm")
    if not torch.cuda.is_available():
        pytest.skip("vLLM needs CUDA")
    return request.getfixturevalue("tiny_model")


@pytest.fixture(scope="module")
def vllm_engine(gpu_model):
    from rayalign.engines.vllm import VLLMEngine

    engine = VLLMEngine(gpu_model, dtype="float32", gpu_memory_utilization=0.3, max_model_len=1024)
    yield engine
    engine.shutdown()


def requests_for(seeds, temperature=1.0, max_new_tokens=32):
    return [GenerationRequest(CHATS[i % len(CHATS)], SamplingParams(temperature, 0.95, max_new_tokens, s))
            for i, s in enumerate(seeds)]


@pytest.mark.gpu
def test_vllm_generate_is_seeded_per_request(vllm_engine):
    first = vllm_engine.generate(requests_for(range(12)))
    assert len(first) == 12 and vllm_engine.generate(requests_for(range(12))) == first
    other = vllm_engine.generate(requests_for(range(100, 112)))
    assert sum(a.text != b.text for a, b in zip(first, other)) >= 6
    for c in first:
        assert c.finish_reason in ("stop", "length") and 1 <= c.num_tokens <= 32
    for c in vllm_engine.generate(requests_for(range(8), max_new_tokens=3)):
        assert c.num_tokens == 3 if c.finish_reason == "length" else 1 <= c.num_tokens <= 3


@pytest.mark.gpu
def test_vllm_score_matches_hf(gpu_model, vllm_engine):
    from rayalign.engines.hf import HFEngine

    hf = HFEngine(gpu_model, dtype="float32", device="cuda")
    samples = hf.generate(requests_for(range(6)))
    requests = [ScoreRequest(CHATS[i % len(CHATS)], s.text) for i, s in enumerate(samples)]
    requests.append(ScoreRequest(CHATS[0], "Paris."))
    want = hf.score(requests)
    got = vllm_engine.score(requests)
    for g, w in zip(got, want):
        assert g.num_tokens == w.num_tokens
        assert g.logp == pytest.approx(w.logp, abs=2e-2)
    del hf
    torch.cuda.empty_cache()


@pytest.mark.gpu
def test_vllm_load_and_update_weights_change_the_model(gpu_model, vllm_engine, tmp_path):
    from transformers import AutoModelForCausalLM

    requests = [ScoreRequest(CHATS[0], "Paris is the capital of France.")]
    before = vllm_engine.score(requests)[0].logp
    model = AutoModelForCausalLM.from_pretrained(gpu_model, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    model.save_pretrained(tmp_path / "policy")
    vllm_engine.tokenizer.save_pretrained(tmp_path / "policy")
    try:
        vllm_engine.load_weights(str(tmp_path / "policy"))
        loaded = vllm_engine.score(requests)[0].logp
        assert abs(loaded - before) > 0.1
        vllm_engine.load_weights(gpu_model)
        assert vllm_engine.score(requests)[0].logp == pytest.approx(before, abs=1e-3)
        vllm_engine.update_weights(model.state_dict().items())  # in place, no rebuild
        assert vllm_engine.score(requests)[0].logp == pytest.approx(loaded, abs=1e-3)
    finally:
        vllm_engine.load_weights(gpu_model)


@pytest.mark.gpu
def test_vllm_throughput_against_hf(gpu_model, vllm_engine):
    from rayalign.engines.hf import HFEngine

    requests = requests_for(range(256), max_new_tokens=64)
    hf = HFEngine(gpu_model, dtype="float32", device="cuda", batch_size=64)
    rates = {}
    for name, engine in (("hf", hf), ("vllm", vllm_engine)):
        engine.generate(requests[:8])  # warm-up
        started = time.perf_counter()
        engine.generate(requests)
        rates[name] = len(requests) / (time.perf_counter() - started)
    print(f"\nsamples/s on {torch.cuda.get_device_name()}: hf {rates['hf']:.1f}, vllm {rates['vllm']:.1f} "
          f"({rates['vllm'] / rates['hf']:.1f}x)")
