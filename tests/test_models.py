import json
import shutil
from pathlib import Path

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


def test_concurrent_first_uses_build_the_tiny_model_once(tmp_path):
    """A second process that needs the tiny model while a first one is building it waits for that build (and
    says so) instead of building its own copy; both get the same directory, and no temporary one is left."""
    import os
    import subprocess
    import sys

    go = tmp_path / "go"

    def start(hold: bool):  # the first builder holds inside its build until the second says it waits for it
        code = ("import sys, time; from pathlib import Path; from rayalign.models import ensure_tiny_model\n"
                "def progress(*a):\n    print('built-step', file=sys.stderr, flush=True)\n"
                f"    deadline = time.time() + 600\n    while {hold} and not Path({str(go)!r}).exists() "
                "and time.time() < deadline:\n        time.sleep(0.1)\n"
                "print(ensure_tiny_model(progress=progress, train_steps=2, hidden_size=32, intermediate_size=64, "
                "num_hidden_layers=1, vocab_size=512))\n")
        return subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "RAYALIGN_CACHE": str(tmp_path)},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    first = start(hold=True)
    assert "built-step" in first.stderr.readline()  # the first process is inside its build now
    second = start(hold=False)
    err2 = ""
    while line := second.stderr.readline():  # up to the line that says it found the build under way
        err2 += line
        if "waiting for another process" in line:
            break
    go.touch()  # now the first may finish its build
    out2, rest2 = second.communicate(timeout=600)
    err2 += rest2
    out1, err1 = first.communicate(timeout=600)
    assert (first.returncode, second.returncode) == (0, 0), (err1, err2)
    path1, path2 = out1.strip().splitlines()[-1], out2.strip().splitlines()[-1]
    assert path1 == path2
    assert "waiting for another process that is building" in err2 and "built-step" not in err2, err2
    built = [p.name for p in (tmp_path / "models").iterdir() if p.is_dir()]
    assert built == [Path(path1).name]
