"""Hugging Face transformers engine: batched generation with a per-sample seeded sampler."""

from __future__ import annotations

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from rayalign.engines import Completion, GenerationRequest, SamplingParams
from rayalign.models import load_causal_lm, load_tokenizer


def sample_next(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
                uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling with temperature and top-p, one uniform per row.

    logits (B, V), temperature (B,), top_p (B,), uniforms (B,) in [0, 1) -> token ids (B,).
    Rows with temperature 0 take the argmax. Each row only depends on its own inputs.
    """
    logits = logits.double()
    greedy = logits.argmax(-1)
    t = temperature.double().clamp_min(1e-6)[:, None]
    probs = torch.softmax(logits / t, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
    before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the tokens ranked above each token
    kept = sorted_probs * (before < top_p.double()[:, None])  # the top token is always kept
    cdf = kept.cumsum(-1)
    target = uniforms.double()[:, None] * cdf[:, -1:]
    pos = torch.searchsorted(cdf, target, right=True).clamp_max(cdf.shape[-1] - 1)
    sampled = order.gather(-1, pos).squeeze(-1)
    return torch.where(temperature == 0, greedy, sampled)


class SeededSampler(LogitsProcessor):
    """Draws each row's next token with that row's own generator and sampling parameters.

    Returns logits that are -inf everywhere but the drawn token, so greedy decoding keeps it.
    """

    def __init__(self, params: list[SamplingParams]):
        self.generators = [torch.Generator().manual_seed(p.seed) for p in params]
        self.temperature = torch.tensor([p.temperature for p in params])
        self.top_p = torch.tensor([p.top_p for p in params])

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        uniforms = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in self.generators])
        tokens = sample_next(scores.float().cpu(), self.temperature, self.top_p, uniforms).to(scores.device)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, tokens[:, None], 0.0)


class HFEngine:
    def __init__(self, model_path: str, *, dtype: str = "auto", device: str | None = None, batch_size: int = 32,
                 trust_remote_code: bool = False):
        self.model_path = model_path
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.batch_size = batch_size
        self.tokenizer = load_tokenizer(model_path, trust_remote_code)
        self.model = load_causal_lm(model_path, dtype, self.device, trust_remote_code)
        eos = self.model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        self.eos_ids = sorted(set(eos) | {self.tokenizer.eos_token_id})

    def encode_prompt(self, messages: list[dict]) -> list[int]:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                  return_dict=False)

    @torch.inference_mode()
    def generate(self, requests: list[GenerationRequest]) -> list[Completion]:
        results: list[Completion | None] = [None] * len(requests)
        by_length: dict[int, list[int]] = {}
        for i, r in enumerate(requests):
            by_length.setdefault(r.params.max_new_tokens, []).append(i)
        for max_new, indices in by_length.items():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start: start + self.batch_size]
                for i, c in zip(chunk, self._generate_batch([requests[i] for i in chunk], max_new)):
                    results[i] = c
        return results

    def _generate_batch(self, requests: list[GenerationRequest], max_new_tokens: int) -> list[Completion]:
        prompts = [self.encode_prompt(r.messages) for r in requests]
        width = max(map(len, prompts))
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=self.device)
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=self.eos_ids,
                                  pad_token_id=pad)
        out = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                                  logits_processor=LogitsProcessorList([SeededSampler([r.params for r in requests])]))
        completions = []
        eos = set(self.eos_ids)
        for row in out[:, width:].tolist():
            end = next((j for j, tok in enumerate(row) if tok in eos), None)
            tokens = row if end is None else row[:end]
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            completions.append(Completion(text=text, num_tokens=len(row) if end is None else end + 1,
                                          finish_reason="length" if end is None else "stop"))
        return completions
