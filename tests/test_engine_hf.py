import hashlib

import numpy as np
import pytest
import torch

from rayalign.engines import GenerationRequest, SamplingParams, sample_seed
from rayalign.engines.hf import HFEngine, sample_next


def np_sample(logits, temperature, top_p, u):
    """Independent reference: softmax, nucleus cut, inverse CDF, in plain numpy."""
    if temperature == 0:
        return int(np.argmax(logits))
    z = np.asarray(logits, dtype=np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    kept, mass = [], 0.0
    for tok in order:
        if mass >= top_p:
            break
        kept.append(tok)
        mass += p[tok]
    cdf = np.cumsum([p[t] for t in kept])
    return int(kept[min(np.searchsorted(cdf, u * cdf[-1], side="right"), len(kept) - 1)])


def test_sample_next_hand_cases():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    # softmax: [0.6439, 0.2369, 0.0871, 0.0321]; cumulative [0.6439, 0.8808, 0.9679, 1.0]
    def draw(t, p, u):
        return sample_next(logits, torch.tensor([t]), torch.tensor([p]), torch.tensor([u])).item()
    assert draw(1.0, 1.0, 0.10) == 0
    assert draw(1.0, 1.0, 0.70) == 1
    assert draw(1.0, 1.0, 0.95) == 2
    assert draw(1.0, 1.0, 0.99) == 3
    assert draw(1.0, 0.8, 0.99) == 1  # top_p 0.8 keeps tokens 0 and 1: 0.99 * 0.8808 = 0.872 -> token 1
    assert draw(1.0, 0.8, 0.70) == 0  # 0.70 * 0.8808 = 0.617 < 0.6439
    assert draw(1.0, 0.5, 0.99) == 0  # only the top token
    assert draw(0.0, 1.0, 0.99) == 0  # greedy ignores u


def test_sample_next_matches_numpy_reference():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(64, 50)) * 3
    temps = rng.choice([0.0, 0.3, 0.9, 1.5], size=64)
    top_ps = rng.choice([0.2, 0.7, 0.95, 1.0], size=64)
    us = rng.random(64)
    got = sample_next(torch.tensor(logits, dtype=torch.float32), torch.tensor(temps), torch.tensor(top_ps),
                      torch.tensor(us)).tolist()
    want = [np_sample(np.float32(logits[i]), temps[i], top_ps[i], us[i]) for i in range(64)]
    assert got == want


def test_sample_next_frequencies_follow_the_distribution():
    logits = torch.tensor([[1.0, 0.5, -0.5]]).repeat(1000, 1)
    u = (torch.arange(1000, dtype=torch.float64) + 0.5) / 1000
    tokens = sample_next(logits, torch.full((1000,), 0.7), torch.ones(1000), u)
    p = torch.softmax(torch.tensor([1.0, 0.5, -0.5], dtype=torch.float64) / 0.7, -1)
    counts = torch.bincount(tokens, minlength=3).double() / 1000
    assert torch.allclose(counts, p, atol=1.5e-3)


def test_sample_seed_is_blake2b_of_the_key():
    key = "7\x1f2\x1fp001\x1fde\x1f3".encode()
    want = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") >> 1
    assert sample_seed(7, 2, "p001", "de", 3) == want
    assert len({sample_seed(7, 1, "p001", lang, k) for lang in ("en", "de") for k in range(4)}) == 8


@pytest.fixture(scope="module")
def engine(tiny_model):
    torch.set_num_threads(2)
    return HFEngine(tiny_model, batch_size=8)


MESSAGES = [[{"role": "user", "content": text}] for text in (
    "How do I boil an egg?", "Wie koche ich ein Ei?", "Как сварить яйцо?", "¿Cómo hiervo un huevo?",
    "Comment faire cuire un œuf ? Donne-moi une réponse très détaillée, s'il te plaît.")]


def requests(seed0=0, temperature=0.9, top_p=1.0, max_new=16):
    return [GenerationRequest(m, SamplingParams(temperature, top_p, max_new, seed0 + 10 * i + k))
            for i, m in enumerate(MESSAGES) for k in range(2)]


def test_chat_template_is_applied(engine):
    ids = engine.encode_prompt(MESSAGES[0])
    text = "<|im_start|>user\nHow do I boil an egg?<|im_end|>\n<|im_start|>assistant\n"
    assert ids == engine.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_a_prompt_is_tokenised_once_for_its_samples_and_its_context_check(tiny_model, monkeypatch):
    from rayalign.config import SamplingConfig
    import pyarrow as pa

    from rayalign.data.schemas import schema_for
    from rayalign.generation import generate_isolating

    fresh = HFEngine(tiny_model, batch_size=8)
    rendered = []
    original = fresh.tokenizer.apply_chat_template
    monkeypatch.setattr(fresh.tokenizer, "apply_chat_template",
                        lambda messages, **kw: rendered.append(messages[-1]["content"]) or original(messages, **kw))
    rows = pa.Table.from_pylist([{"prompt_id": f"p{i}", "lang": "en", "messages": m} for i, m in enumerate(MESSAGES[:2])],
                                schema=schema_for("prompts")[1])
    samples, _ = generate_isolating(fresh, rows, SamplingConfig(n=4, max_new_tokens=4), 1, "tiny")
    assert samples.num_rows == 8 and rendered == [m[0]["content"] for m in MESSAGES[:2]]
    reference = original(MESSAGES[0], add_generation_prompt=True, tokenize=True, return_dict=False)
    assert fresh.encode_prompt(MESSAGES[0]) == reference and len(rendered) == 2


def test_results_do_not_depend_on_batching_or_order(engine):
    reqs = requests()
    base = engine.generate(reqs)
    engine.batch_size = 1
    try:
        assert engine.generate(reqs) == base
    finally:
        engine.batch_size = 8
    assert engine.generate(reqs[::-1])[::-1] == base
    assert engine.generate(reqs[3:6]) == base[3:6]


def test_the_checkpoints_sampling_defaults_are_ignored(engine, tiny_model, tmp_path):
    """As vLLM with generation_config="vllm": a generation_config.json's repetition penalty and n-gram ban changed
    every greedy answer of the HF engine (transformers fills unset fields from the model's generation config)."""
    import json
    import shutil

    shutil.copytree(tiny_model, tmp_path / "model")
    path = tmp_path / "model" / "generation_config.json"
    defaults = json.loads(path.read_text()) if path.is_file() else {}
    path.write_text(json.dumps(defaults | {"repetition_penalty": 2.0, "no_repeat_ngram_size": 2, "min_new_tokens": 8}))
    greedy = requests(temperature=0.0)
    assert HFEngine(str(tmp_path / "model"), batch_size=8).generate(greedy) == engine.generate(greedy)


def test_seeds_decide_samples(engine):
    a, b = engine.generate(requests(0)), engine.generate(requests(1000))
    assert a == engine.generate(requests(0))
    assert sum(x.text != y.text for x, y in zip(a, b)) >= len(a) // 2


def test_greedy_matches_a_plain_forward_loop(engine):
    reqs = requests(temperature=0.0, max_new=10)[:4:2]
    got = engine.generate(reqs)
    for req, completion in zip(reqs, got):
        ids = torch.tensor([engine.encode_prompt(req.messages)])
        new = []
        with torch.no_grad():
            for _ in range(10):
                tok = engine.model(ids).logits[0, -1].argmax().item()
                new.append(tok)
                if tok in engine.eos_ids:
                    break
                ids = torch.cat([ids, torch.tensor([[tok]])], 1)
        body = new[:-1] if new[-1] in engine.eos_ids else new
        assert completion.text == engine.tokenizer.decode(body, skip_special_tokens=True)
        assert completion.num_tokens == len(new)
        assert completion.finish_reason == ("stop" if new[-1] in engine.eos_ids else "length")


def test_length_limit(engine):
    out = engine.generate([GenerationRequest(MESSAGES[0], SamplingParams(5.0, 1.0, 3, 1))])[0]
    assert out.num_tokens <= 3
    if out.finish_reason == "length":
        assert out.num_tokens == 3
