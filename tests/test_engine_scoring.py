"""Teacher-forced scoring in the HF engine, checked against a plain one-sequence forward pass written here."""

import json
import random

import numpy as np
import pytest
import torch

from conftest import PROMPTS_DIR
from rayalign.engines import ScoreRequest
from rayalign.engines.hf import HFEngine, response_mask, token_logprobs

LAYERS = (0, 2, 4)  # the tiny model has 4 decoder layers: embeddings, a middle layer, the last (after the norm)
TOL = dict(rtol=0.0, atol=1e-5)


def corpus_row(lang: str, index: int) -> dict:
    lines = (PROMPTS_DIR / f"{lang}.jsonl").read_text(encoding="utf-8").splitlines()
    return json.loads(lines[index])


def make_requests() -> list[ScoreRequest]:
    """Prompts and responses in three languages with different lengths, one response in another language."""
    en, de, ru = corpus_row("en", 0), corpus_row("de", 1), corpus_row("ru", 2)
    de_long = corpus_row("de", 3)
    return [
        ScoreRequest([{"role": "user", "content": en["instruction"]}], en["output"]),
        ScoreRequest([{"role": "user", "content": de["instruction"]}], de["output"][: len(de["output"]) // 2]),
        ScoreRequest([{"role": "user", "content": ru["instruction"]}], " ".join(ru["output"].split()[:3])),
        ScoreRequest([{"role": "user", "content": de_long["instruction"] + " " + de["instruction"]}], "Ja."),
        ScoreRequest([{"role": "user", "content": "Как сварить яйцо?"}], en["output"][:40]),
    ]


@pytest.fixture(scope="module")
def engine(tiny_model):
    torch.set_num_threads(2)
    return HFEngine(tiny_model, dtype="float32", device="cpu", batch_size=8)


@pytest.fixture(scope="module")
def reqs():
    return make_requests()


@pytest.fixture(scope="module")
def base(engine, reqs):
    return engine.score(reqs, layers=list(LAYERS))


def plain(engine, request: ScoreRequest) -> dict:
    """One unpadded sequence through the model, log-softmax and gather, written without the engine's code."""
    tok = engine.tokenizer
    prompt = tok.apply_chat_template(request.messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    response = tok(request.response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    full = torch.tensor([list(prompt) + response])
    with torch.no_grad():
        out = engine.model(full, output_hidden_states=True)
    logprobs = torch.log_softmax(out.logits[0, :-1].double(), dim=-1)
    next_tokens = full[0, 1:]
    token_lp = logprobs.gather(1, next_tokens[:, None])[:, 0]
    p = len(prompt)
    raw = len(tok(request.messages[-1]["content"], add_special_tokens=False)["input_ids"])
    return {
        "logp": token_lp[p - 1:].sum().item(),  # the first response token is predicted from the last prompt token
        "prompt_logp": token_lp[:p - 1].sum().item(),  # tokens 1..p-1 of the prompt
        "end_of_turn_logp": token_lp[-1].item(),  # the tiny model's turn ends with one token, its eos
        "num_tokens": len(response),
        "prompt_len": p,
        "raw_len": raw,
        "pooled": {l: out.hidden_states[l][0, p:].mean(0).numpy() for l in LAYERS},
        "pooled_raw_start": {l: out.hidden_states[l][0, raw:].mean(0).numpy() for l in LAYERS},
    }


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.num_tokens == y.num_tokens
        assert x.logp == pytest.approx(y.logp, rel=TOL["rtol"], abs=TOL["atol"])
        assert x.pooled.keys() == y.pooled.keys()
        for layer in x.pooled:
            np.testing.assert_allclose(x.pooled[layer], y.pooled[layer], **TOL)


def test_response_mask_hand_cases():
    # row 0: prompt 2, total 4; row 1: prompt 3, total 6; width 6
    right = response_mask([2, 3], [4, 6], 6, left_padded=False)
    assert right.tolist() == [[0, 0, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1]]
    left = response_mask([2, 3], [4, 6], 6, left_padded=True)
    assert left.tolist() == [[0, 0, 0, 0, 1, 1], [0, 0, 0, 1, 1, 1]]


def test_token_logprobs_chunks_match_log_softmax():
    logits = torch.randn(7, 11, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    targets = torch.tensor([0, 3, 10, 5, 5, 1, 2])
    want = torch.log_softmax(logits.float(), -1).gather(1, targets[:, None])[:, 0]
    got = token_logprobs(logits, targets, max_elements=22)  # two rows per chunk
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want)


def test_logp_and_num_tokens_match_a_plain_forward(engine, reqs, base):
    for request, result in zip(reqs, base):
        want = plain(engine, request)
        assert result.num_tokens == want["num_tokens"]
        assert result.logp == pytest.approx(want["logp"], rel=TOL["rtol"], abs=TOL["atol"])
        assert result.logp < 0
    assert len({r.num_tokens for r in base}) == len(base)  # the lengths really differ


def test_pooled_states_use_the_templated_prompt_offset(engine, reqs, base):
    for request, result in zip(reqs, base):
        want = plain(engine, request)
        assert set(result.pooled) == set(LAYERS)
        for layer in LAYERS:
            got = result.pooled[layer]
            assert got.dtype == np.float32 and got.shape == (engine.model.config.hidden_size,)
            np.testing.assert_allclose(got, want["pooled"][layer], **TOL)
        # The released LaCoMSA code starts the mean at the raw instruction's token count: the chat-template header
        # and the tail of the prompt leak into the mean. Document that this differs.
        assert want["raw_len"] < want["prompt_len"]
        for layer in LAYERS:
            assert not np.allclose(result.pooled[layer], want["pooled_raw_start"][layer], rtol=1e-3, atol=1e-3)


def test_results_do_not_depend_on_batching_or_padding_side(engine, reqs, base):
    one_by_one = [engine.score([r], layers=list(LAYERS))[0] for r in reqs]
    assert_same(one_by_one, base)
    shuffled = list(range(len(reqs)))
    random.Random(3).shuffle(shuffled)
    engine.batch_size = 2
    try:
        assert_same(engine.score(reqs[::-1], layers=list(LAYERS))[::-1], base)
        got = engine.score([reqs[i] for i in shuffled], layers=list(LAYERS))
        assert_same([got[shuffled.index(i)] for i in range(len(reqs))], base)
    finally:
        engine.batch_size = 8
    engine.max_batch_tokens = 120  # token budget: fewer rows per batch than batch_size
    try:
        assert_same(engine.score(reqs, layers=list(LAYERS)), base)
    finally:
        engine.max_batch_tokens = None
    engine.padding_side = "left"
    try:
        assert_same(engine.score(reqs, layers=list(LAYERS)), base)
        assert_same(engine.score(reqs[::-1], layers=list(LAYERS))[::-1], base)
    finally:
        engine.padding_side = "right"


def test_prompt_and_end_of_turn_parts_match_a_plain_forward(engine, reqs, base):
    # with_prompt on every other request, in batches that mix both kinds, with either padding side
    asked = [ScoreRequest(r.messages, r.response, with_prompt=i % 2 == 0) for i, r in enumerate(reqs)]
    for side in ("right", "left"):
        engine.padding_side, engine.batch_size = side, 3
        try:
            got = engine.score(asked)
        finally:
            engine.padding_side, engine.batch_size = "right", 8
        for i, (request, result, before) in enumerate(zip(reqs, got, base)):
            want = plain(engine, request)
            assert result.logp == pytest.approx(before.logp, rel=TOL["rtol"], abs=TOL["atol"])
            assert result.end_of_turn_tokens == 1
            assert result.end_of_turn_logp == pytest.approx(want["end_of_turn_logp"], rel=0, abs=TOL["atol"])
            if i % 2 == 0:
                assert result.prompt_tokens == want["prompt_len"]
                assert result.prompt_logp == pytest.approx(want["prompt_logp"], rel=0, abs=TOL["atol"])
            else:
                assert result.prompt_logp is None and result.prompt_tokens == 0


def test_layers_are_optional(engine, reqs, base):
    got = engine.score(reqs[:2])
    assert all(r.pooled == {} for r in got)
    assert [r.logp for r in got] == pytest.approx([r.logp for r in base[:2]], rel=TOL["rtol"], abs=TOL["atol"])
    assert engine.score([]) == []


def test_batches_follow_the_row_and_token_budget(engine):
    engine.batch_size, engine.max_batch_tokens = 3, 20
    try:
        # longest first; width 9 allows two rows (18 <= 20), width 5 allows three (batch_size)
        assert engine._score_batches([5, 9, 4, 8, 5, 30, 3]) == [[5], [1, 3], [0, 4, 2], [6]]
    finally:
        engine.batch_size, engine.max_batch_tokens = 8, None


def test_empty_response_scores_the_end_of_turn_token(engine):
    request = ScoreRequest([{"role": "user", "content": "Wie koche ich ein Ei?"}], "")
    got = engine.score([request], layers=[4])[0]
    want = plain(engine, request)
    assert got.num_tokens == want["num_tokens"] == 1
    assert got.logp == pytest.approx(want["logp"], rel=TOL["rtol"], abs=TOL["atol"])
    np.testing.assert_allclose(got.pooled[4], want["pooled"][4], **TOL)


@pytest.mark.parametrize("layer", [5, -1, 2.0])
def test_invalid_layer_is_refused(engine, reqs, layer):
    with pytest.raises(ValueError, match=rf"layer {layer!r} .*0\.\.4"):
        engine.score(reqs[:1], layers=[0, layer])
