"""Model and tokenizer loading from a path, and the tiny offline model builder.

Every model in rayalign is loaded with `from_pretrained(path)`; the tiny model is built from a
config and a locally trained tokenizer, saved with `save_pretrained`, and then loaded through the
same code as a real checkpoint.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
import weakref
from pathlib import Path

from rayalign.config import is_tiny_model

TINY_BUILDER_VERSION = 1
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|im_start|>", "<|im_end|>"]
TINY_DEFAULTS = dict(vocab_size=2048, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=2, max_length=192,
                     train_steps=400, batch_size=16, lr=3e-3, seed=0)


class ModelLoadError(RuntimeError):
    """A model directory that cannot be loaded; the message names the directory and what is missing."""


def cache_dir() -> Path:
    return Path(os.environ.get("RAYALIGN_CACHE", Path.home() / ".cache" / "rayalign"))


def tiny_corpus_dir() -> Path:
    """The bundled parallel prompt set (instruction + answer per language) the tiny model learns from."""
    env = os.environ.get("RAYALIGN_TINY_CORPUS")
    path = Path(env) if env else Path(__file__).resolve().parents[1] / "examples" / "data" / "prompts"
    if not path.is_dir():
        raise ModelLoadError(f"{path}: tiny-model corpus not found; set RAYALIGN_TINY_CORPUS to a directory of "
                             "<lang>.jsonl files with instruction and output")
    return path


def _corpus_documents(corpus: Path) -> list[list[dict]]:
    docs = []
    for file in sorted(corpus.glob("*.jsonl")):
        for line in file.read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                docs.append([{"role": "user", "content": row["instruction"]},
                             {"role": "assistant", "content": row["output"]}])
    if not docs:
        raise ModelLoadError(f"{corpus}: no <lang>.jsonl files with instruction/output rows")
    return docs


def build_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on `texts`, with a ChatML-style chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|im_end|>",
                                   additional_special_tokens=["<|im_start|>"], chat_template=CHAT_TEMPLATE,
                                   padding_side="left", model_max_length=4096)


def build_tiny_model(out_dir: str | Path, corpus: str | Path | None = None, *, progress=None, **overrides) -> Path:
    """Build, briefly train and save a tiny Llama-architecture chat model and its tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    p = {**TINY_DEFAULTS, **overrides}
    docs = _corpus_documents(Path(corpus) if corpus else tiny_corpus_dir())
    tokenizer = build_tokenizer([m["content"] for d in docs for m in d], p["vocab_size"])
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=p["hidden_size"], intermediate_size=p["intermediate_size"],
        num_hidden_layers=p["num_hidden_layers"], num_attention_heads=p["num_attention_heads"],
        num_key_value_heads=p["num_key_value_heads"], max_position_embeddings=4096, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(p["seed"])
    model = LlamaForCausalLM(config)
    encoded = [tokenizer.apply_chat_template(d, tokenize=True, return_dict=False)[: p["max_length"]] for d in docs]
    losses = _train_causal_lm(model, encoded, tokenizer.pad_token_id, p, progress)
    out_dir = Path(out_dir)
    _quiet_transformers()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "rayalign_tiny.json").write_text(json.dumps(
        {"builder_version": TINY_BUILDER_VERSION, "params": p, "documents": len(docs),
         "loss_first": losses[0], "loss_last": losses[-1]}, indent=2))
    return out_dir


def _train_causal_lm(model, encoded: list[list[int]], pad_id: int, p: dict, progress) -> list[float]:
    import torch

    gen = torch.Generator().manual_seed(p["seed"])
    opt = torch.optim.AdamW(model.parameters(), lr=p["lr"], weight_decay=0.01)
    warmup = max(1, p["train_steps"] // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / p["train_steps"]))))
    model.train()
    losses = []
    for step in range(p["train_steps"]):
        idx = torch.randint(len(encoded), (p["batch_size"],), generator=gen).tolist()
        width = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), width), pad_id)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, : len(encoded[i])] = torch.tensor(encoded[i])
            mask[row, : len(encoded[i])] = 1
        labels = ids.masked_fill(mask == 0, -100)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if progress is not None:
            progress(step + 1, p["train_steps"], losses[-1])
    model.eval()
    return losses


def build_reward_model_from(lm_dir: str | Path, out_dir: str | Path, seed: int = 0) -> Path:
    """A sequence-classification reward model (one output) on a causal LM's body, head initialised
    from `seed`: the tiny stand-in for an English reward model in tests and quickstarts."""
    import torch
    from transformers import AutoModelForSequenceClassification

    _quiet_transformers()
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(lm_dir, num_labels=1)
    model.save_pretrained(out_dir)
    load_tokenizer(str(lm_dir)).save_pretrained(out_dir)
    return Path(out_dir)


def tiny_model_key(corpus: Path, params: dict) -> str:
    h = hashlib.sha256(json.dumps({"v": TINY_BUILDER_VERSION, **params}, sort_keys=True).encode())
    for file in sorted(corpus.glob("*.jsonl")):
        h.update(file.name.encode())
        h.update(file.read_bytes())
    return h.hexdigest()[:12]


def ensure_tiny_model(progress=None, **overrides) -> Path:
    """The cached tiny model directory, built on first use (1 to 5 minutes on 2 CPU cores)."""
    params = {**TINY_DEFAULTS, **overrides}
    corpus = tiny_corpus_dir()
    target = cache_dir() / "models" / f"tiny-multilingual-{tiny_model_key(corpus, params)}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # one build at a time: other processes wait for it rather than build their own copy (the lock dies with
    # its process, so a killed build never blocks the next)
    with open(target.parent / f"{target.name}.lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another process that is building {target} (first use only)", file=sys.stderr,
                  flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "config.json").is_file():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
        try:
            build_tiny_model(tmp, corpus, progress=progress, **overrides)
            try:
                os.rename(tmp, target)
            except OSError:  # built by a process the lock does not reach (another node): keep theirs
                if not (target / "config.json").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(path: str, progress=None) -> str:
    """A loadable model location: builds the tiny model for TINY_MODEL, checks local directories.

    `builtin:tiny-multilingual?train_steps=100` builds a variant (e.g. a weaker reference model).
    """
    if is_tiny_model(path):
        return str(ensure_tiny_model(progress=progress, **_tiny_overrides(path)))
    p = Path(path).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise ModelLoadError(f"{p}: not a model directory (no config.json)")
        _require_tokenizer(p)  # here, before any actor is started: an actor's load error would only kill it
        _require_whole_weights(p)
        return str(p.resolve())
    if path.startswith((".", "/", "~")):
        raise ModelLoadError(f"{path}: model directory not found")
    from rayalign.data.hub import HubError, check_model_source

    try:
        check_model_source("model", path)
    except HubError as e:
        raise ModelLoadError(str(e)) from None
    return path  # a hub id, resolved by transformers (from its local cache when offline)


def check_model_code(section: str, model) -> None:
    """Refuse, before any actor starts, a model whose config.json names code of its own (auto_map) for a model
    type transformers does not know, unless `<section>.trust_remote_code` is true: every actor would fail on it.
    Also refuses a local config.json that transformers cannot read. `section` is the model's recipe key."""
    if model.trust_remote_code or is_tiny_model(model.path):
        return
    from transformers import AutoConfig

    local = Path(model.path).expanduser()
    try:
        AutoConfig.from_pretrained(str(local) if local.is_dir() else model.path, trust_remote_code=False)
    except ValueError as e:
        if "trust_remote_code" in str(e):
            auto_map = _auto_map(local / "config.json") if local.is_dir() else ""
            raise ModelLoadError(
                f"{section}.path: {model.path}: this model needs its own Python code{auto_map}, which rayalign runs "
                f"only when told to: set {section}.trust_remote_code: true if you trust the code it ships (it runs "
                "in every actor that loads the model), or choose a model whose type transformers supports") from None
        if local.is_dir():
            raise ModelLoadError(f"{section}.path: {local / 'config.json'}: {str(e).splitlines()[0]}") from None
    except OSError as e:
        if local.is_dir():  # unreadable or invalid JSON; a hub id not reachable is left to check_model_source
            raise ModelLoadError(f"{section}.path: {local / 'config.json'}: {str(e).splitlines()[0]}") from None


def _auto_map(config_file: Path) -> str:
    try:
        auto_map = json.loads(config_file.read_text(encoding="utf-8")).get("auto_map") or {}
    except (OSError, ValueError, AttributeError):
        return ""
    return f" (config.json auto_map: {', '.join(f'{k} -> {v}' for k, v in auto_map.items())})" if auto_map else ""


def _tiny_overrides(path: str) -> dict:
    overrides = {}
    query = path.partition("?")[2]
    for item in filter(None, query.split("&")):
        key, _, value = item.partition("=")
        if key not in TINY_DEFAULTS:
            raise ModelLoadError(f"{path}: unknown tiny-model setting {key!r} (known: {', '.join(TINY_DEFAULTS)})")
        try:
            overrides[key] = type(TINY_DEFAULTS[key])(value)
        except ValueError:
            raise ModelLoadError(f"{path}: {key} expects a {type(TINY_DEFAULTS[key]).__name__}, got {value!r}") from None
    return overrides


def _require_whole_weights(p: Path) -> None:
    """Every safetensors file's header must parse and its tensors fit in the file: a truncated or garbled weights
    file is named here, not as a load error in every actor. (Changed bytes inside a tensor are not detected: the
    run's own policies are checked against the checksums recorded in state.json.)"""
    from safetensors import safe_open

    if not any(p.glob("*.safetensors")) and not any(p.glob("pytorch_model*.bin")):
        raise ModelLoadError(f"{p}: no weights (expected model.safetensors, model-*.safetensors or pytorch_model.bin "
                             "next to config.json; save the model with save_pretrained)")
    for file in sorted(p.glob("*.safetensors")):
        try:
            with safe_open(str(file), "np"):
                pass
        except Exception as e:  # SafetensorError, OSError
            raise ModelLoadError(f"{file}: damaged or incomplete weights file ({e}); copy the model again") from None


def _require_tokenizer(p: Path) -> None:
    if not any((p / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise ModelLoadError(f"{p}: no tokenizer (expected tokenizer.json, tokenizer.model or vocab.json "
                             "next to config.json; save it with tokenizer.save_pretrained)")


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    p = Path(path)
    if p.is_dir():
        _require_tokenizer(p)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.chat_template is None:
        raise ModelLoadError(f"{path}: the tokenizer has no chat template")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def pad_id(tokenizer) -> int:
    """The padding token, or the eos token for tokenizers without one (padded positions are masked anyway)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


_END_OF_TURN_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_MARKER = "RAYALIGNENDOFTURNMARKER"


def end_of_turn_ids(tokenizer) -> list[int]:
    """The token ids the chat template writes right after an assistant message's content, up to and including its
    end-of-turn token (the first special token there): [<|eot_id|>] for Llama-3, [<|im_end|>] for Qwen2.5 and
    ChatML, [<end_of_turn>] for Gemma-2, [</s>] for Mistral. Formatting after it (Qwen's and Gemma's "\n") is left
    out: generation stops at the end-of-turn token. This, not `tokenizer.eos_token`, closes every teacher-forced
    response (scoring and the training target) and stops generation; Llama-3 base/SFT checkpoints have eos
    <|end_of_text|> but close a turn with <|eot_id|>. A template that writes nothing after the content falls back
    to the eos token. The tail is read as tokenized in the rendered conversation (a sentencepiece tokenizer puts
    a word-start mark before text tokenized alone: Llama-2's " </s>" would gain a second "▁"), and any added token
    closes the turn (ChatML tokens added without the special flag)."""
    key = (tokenizer.chat_template, tokenizer.eos_token_id)
    cached = _END_OF_TURN_CACHE.get(tokenizer)
    if cached is not None and cached[0] == key:
        return list(cached[1])
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _MARKER}]
    text = tokenizer.apply_chat_template(conversation, tokenize=False)
    if _MARKER not in text:
        raise ValueError(f"{tokenizer.name_or_path}: the chat template does not write the assistant's content")
    head = text[: text.rindex(_MARKER) + len(_MARKER)]
    whole, before = (list(tokenizer(part, add_special_tokens=False)["input_ids"]) for part in (text, head))
    after = whole[len(before):] if whole[:len(before)] == before else \
        list(tokenizer(text[len(head):], add_special_tokens=False)["input_ids"])  # the boundary merged: alone
    special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    end = next((k for k, i in enumerate(after) if i in special), None)
    ids = after[: end + 1] if end is not None else []
    if not ids:
        if tokenizer.eos_token_id is None:
            raise ValueError(f"{tokenizer.name_or_path}: the chat template writes no end-of-turn token after an "
                             "assistant message and the tokenizer has no eos token to close a response")
        ids = [tokenizer.eos_token_id]
    _END_OF_TURN_CACHE[tokenizer] = (key, tuple(ids))
    return ids


def stop_token_ids(tokenizer, generation_eos=None) -> list[int]:
    """Generation stops at the template's end-of-turn token, the tokenizer's eos and the generation config's eos."""
    eos = [generation_eos] if isinstance(generation_eos, int) else list(generation_eos or [])
    return sorted({end_of_turn_ids(tokenizer)[-1], *eos} | ({tokenizer.eos_token_id} - {None}))


def encode_response(tokenizer, messages: list[dict], response: str) -> tuple[list[int], list[int]]:
    """(prompt_ids, response_ids) as every teacher-forced pass sees them (scoring and training alike): the templated
    prompt with the assistant header, then the response's tokens and the template's end-of-turn tokens
    (`end_of_turn_ids`)."""
    prompt = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                return_dict=False))
    if not prompt:
        raise ValueError("the chat template produced no prompt tokens; the first response token needs a preceding "
                         "position to be predicted from")
    return prompt, list(tokenizer(response, add_special_tokens=False)["input_ids"]) + end_of_turn_ids(tokenizer)


def torch_dtype(name: str, device: str):
    import torch

    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, name)


def _quiet_transformers() -> None:
    from transformers.utils import logging

    logging.disable_progress_bar()


def disable_dropout(model):
    """Every dropout of `model` set to 0: nn.Dropout modules, and the attention probability transformers keeps as a
    float. A trainer's forward in train mode then equals an engine's in eval mode (the first PPO ratio is 1), and a
    critic's values (a token-classification head, classifier_dropout 0.1 by default) are deterministic, so a resume
    repeats them. TRL, OpenRLHF and verl train without dropout too."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
    return model


def load_causal_lm(path: str, dtype: str = "auto", device: str = "cpu", trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM

    _quiet_transformers()
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype, device),
                                                 trust_remote_code=trust_remote_code)
    model.to(device).eval()
    model.load_seconds = time.perf_counter() - started
    return model
