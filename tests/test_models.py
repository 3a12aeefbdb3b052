import json
import shutil

import pytest
import torch

from rayalign.models import ModelLoadError, load_causal_lm, load_tokenizer, resolve_model_path


def test_tiny_model_loads_like_a_real_checkpoint(tiny_model):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(tiny_model)
    assert config.model_type == "llama" and config.num_hidden_layers == 4
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    tok = load_tokenizer(tiny_model)
    assert tok.chat_template and tok.eos_token == "<|im_end|>" and tok.pad_token == "<|pad|>"
    assert len(tok) == config.vocab_size
    ours = load_causal_lm(resolve_model_path(tiny_model))
    ids = torch.tensor([tok.apply_chat_template([{"role": "user", "content": "Hallo!"}], add_generation_prompt=True,
                                                tokenize=True, return_dict=False)])
    assert torch.equal(ours(ids).logits, model(ids).logits)
    info = json.loads(open(f"{tiny_model}/rayalign_tiny.json").read())
    assert info["loss_last"] < info["loss_first"]  # the short training run learned something


def test_tokenizer_round_trips_all_bundled_scripts(tiny_model):
    tok = load_tokenizer(tiny_model)
    for text in ("Hello, world!", "¿Dónde está el baño?", "Straße über Größe", "œuvre à côté", "Привет, мир!"):
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_model_dir_without_tokenizer_is_refused(tiny_model, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(f"{tiny_model}/{f}", bare / f)
    with pytest.raises(ModelLoadError, match=f"{bare}: no tokenizer"):
        load_tokenizer(str(bare))


def test_bad_model_paths(tmp_path):
    with pytest.raises(ModelLoadError, match="model directory not found"):
        resolve_model_path(str(tmp_path / "missing"))
    with pytest.raises(ModelLoadError, match="not a model directory \\(no config.json\\)"):
        resolve_model_path(str(tmp_path))
