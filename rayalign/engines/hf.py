"""Hugging Face transformers engine: batched generation with a per-sample seeded sampler, and teacher-forced
scoring (response log-probs and response-pooled hidden states in one forward pass)."""

from __future__ import annotations

import inspect

import numpy as np
import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from rayalign.engines import ChatPrompts, Completion, GenerationRequest, SamplingParams, ScoreRequest, ScoreResult
from rayalign.models import encode_response, end_of_turn_ids, load_causal_lm, load_tokenizer, pad_id, stop_token_ids


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


def response_mask(prompt_lens, seq_lens, width: int, left_padded: bool) -> torch.Tensor:
    """(B, width) bool, True at each padded row's response positions.

    Row i holds seq_lens[i] real tokens, the first prompt_lens[i] of them the templated prompt (so the response
    starts at the templated prompt's token count, not at the raw instruction's length). Left-padded rows end at
    `width`; right-padded rows start at 0.
    """
    prompt = torch.as_tensor(prompt_lens, dtype=torch.long).reshape(-1, 1)
    seq = torch.as_tensor(seq_lens, dtype=torch.long).reshape(-1, 1)
    offset = width - seq if left_padded else torch.zeros_like(seq)
    pos = torch.arange(width).reshape(1, -1)
    return (pos >= offset + prompt) & (pos < offset + seq)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, max_elements: int = 1 << 26) -> torch.Tensor:
    """log softmax(logits)[target] per row in float32: logits (N, V) in any dtype, targets (N,) -> (N,).

    Works through the rows in chunks of at most `max_elements` logits, so the float32 copy stays bounded
    whatever the model's dtype and vocabulary.
    """
    out = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    step = max(1, max_elements // max(1, logits.shape[-1]))
    for start in range(0, logits.shape[0], step):
        chunk = logits[start: start + step].float()
        picked = chunk.gather(1, targets[start: start + step, None]).squeeze(1)
        out[start: start + step] = picked - torch.logsumexp(chunk, dim=-1)
    return out


class HFEngine:
    def __init__(self, model_path: str, *, dtype: str = "auto", device: str | None = None, batch_size: int = 32,
                 trust_remote_code: bool = False, padding_side: str = "right", max_batch_tokens: int | None = None):
        self.model_path = model_path
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.batch_size = batch_size
        self.padding_side = padding_side  # score() only; generate() always left-pads
        self.max_batch_tokens = max_batch_tokens  # score(): padded tokens per forward pass (rows * width), None = no cap
        self.tokenizer = load_tokenizer(model_path, trust_remote_code)
        self.encode_prompt = ChatPrompts(self.tokenizer)
        self.model = load_causal_lm(model_path, dtype, self.device, trust_remote_code)
        self.eos_ids = stop_token_ids(self.tokenizer, self.model.generation_config.eos_token_id)
        # generate() fills every unset field from the model's generation_config: a checkpoint's sampling defaults
        # (repetition_penalty, no_repeat_ngram_size, ...) would leak in, which vLLM (generation_config="vllm") ignores
        self.model.generation_config = GenerationConfig(eos_token_id=self.eos_ids, pad_token_id=self.tokenizer.pad_token_id)

    @torch.no_grad()
    def update_weights(self, named_tensors: dict) -> None:
        """Load new weights in place (online RL: the trainer's parameters after a step), by parameter name."""
        params = dict(self.model.named_parameters())
        unknown = sorted(set(named_tensors) - set(params))
        if unknown:
            raise KeyError(f"{self.model_path}: update_weights got unknown parameter {unknown[0]!r}")
        for name, value in named_tensors.items():
            params[name].copy_(torch.as_tensor(value))

    def weights(self) -> dict:
        return {name: p.detach().float().cpu().numpy() for name, p in self.model.named_parameters()}

    def join_weight_group(self, host: str, port: int, rank: int, world_size: int) -> None:
        """Join trainer rank 0's NCCL weight-sync group (CUDA engines; see rayalign.training.weight_sync)."""
        from rayalign.training.weight_sync import join_group

        self.weight_group = join_group(host, port, rank, world_size)

    @torch.no_grad()
    def receive_weights(self, meta: list) -> None:
        """Take every parameter trainer rank 0 broadcasts, in place."""
        from rayalign.training.weight_sync import receive_parameters

        params = dict(self.model.named_parameters())
        for name, tensor in receive_parameters(self.weight_group, meta, self.device):
            params[name].copy_(tensor)

    @torch.no_grad()
    def receive_shared(self, shared: list) -> None:
        """Copy the trainer's parameters from its CUDA IPC handles (an engine on trainer rank 0's GPU), in place."""
        from rayalign.training.weight_sync import open_shared

        params = dict(self.model.named_parameters())
        for name, tensor in open_shared(shared):
            params[name].copy_(tensor)
        torch.cuda.synchronize()  # copied before the trainer's next step writes the shared memory

    @torch.inference_mode()
    def token_logps(self, sequences: list[tuple[list[int], list[int]]]) -> list[list[float]]:
        """Teacher-forced log-prob of every response token of (prompt ids, response ids) pairs, in order (right
        padding, `batch_size` rows per forward)."""
        out = []
        for start in range(0, len(sequences), self.batch_size):
            batch = [list(p) + list(r) for p, r in sequences[start:start + self.batch_size]]
            width = max(len(ids) for ids in batch)
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            for i, row in enumerate(batch):
                ids[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), 1
            ids, mask = ids.to(self.device), mask.to(self.device)
            logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
            logps = token_logprobs(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).view(len(batch), -1)
            for i, (prompt, response) in enumerate(sequences[start:start + self.batch_size]):
                out.append(logps[i, len(prompt) - 1:len(prompt) - 1 + len(response)].tolist())
        return out

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
                                          finish_reason="length" if end is None else "stop",
                                          token_ids=tuple(row if end is None else row[:end + 1])))
        return completions

    # ---- teacher-forced scoring -------------------------------------------------------------------------------

    @property
    def num_hidden_layers(self) -> int:
        config = self.model.config
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        return int(config.num_hidden_layers)

    def check_layers(self, layers) -> list[int]:
        """The requested hidden-state indices, each in 0..L (0 = embeddings, L = last layer after the final norm)."""
        n = self.num_hidden_layers
        checked = []
        for layer in layers:
            if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not 0 <= layer <= n:
                raise ValueError(f"score: layer {layer!r} is not a hidden-state index of {self.model_path}: expected an "
                                 f"int in 0..{n} (0 = the embeddings, {n} = the last decoder layer after the final norm)")
            checked.append(int(layer))
        return list(dict.fromkeys(checked))

    def encode_score(self, request: ScoreRequest) -> tuple[list[int], list[int]]:
        """(prompt_ids, response_ids): the templated prompt with the assistant header, and the response's tokens
        followed by the chat template's end-of-turn tokens (`end_of_turn_ids`)."""
        return encode_response(self.tokenizer, request.messages, request.response)

    def _score_batches(self, lengths: list[int]) -> list[list[int]]:
        """Request indices, longest first, cut into batches of at most batch_size rows and max_batch_tokens padded
        tokens (a single row longer than the budget gets a batch of its own)."""
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        batches: list[list[int]] = []
        for i in order:
            if batches:
                last = batches[-1]
                width = lengths[last[0]]  # the first row of a batch is its longest
                if len(last) < self.batch_size and (self.max_batch_tokens is None
                                                    or (len(last) + 1) * width <= self.max_batch_tokens):
                    last.append(i)
                    continue
            batches.append([i])
        return batches

    @torch.inference_mode()
    def score(self, requests: list[ScoreRequest], layers: list[int] = ()) -> list[ScoreResult]:
        """Teacher-forced scores of each request's response under its chat prompt, in the order of `requests`.

        logp: the sum of the log-probs of the response tokens (end-of-turn included), each predicted from the
        position before it; pooled[layer]: the mean of hidden_states[layer] over the response positions, float32.
        Rows are sorted by length and batched; neither the batching nor `padding_side` changes the results.
        """
        layers = self.check_layers(layers)
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"HFEngine.padding_side: expected left or right, got {self.padding_side!r}")
        encoded = [self.encode_score(r) for r in requests]
        results: list[ScoreResult | None] = [None] * len(requests)
        for batch in self._score_batches([len(p) + len(r) for p, r in encoded]):
            for i, result in zip(batch, self._score_batch([encoded[i] for i in batch], layers,
                                                          [requests[i].with_prompt for i in batch])):
                results[i] = result
        return results

    def _score_batch(self, encoded: list[tuple[list[int], list[int]]], layers: list[int],
                     with_prompt: list[bool] | None = None) -> list[ScoreResult]:
        left = self.padding_side == "left"
        with_prompt = with_prompt or [False] * len(encoded)
        num_eot = len(end_of_turn_ids(self.tokenizer))
        prompt_lens = [len(p) for p, _ in encoded]
        seq_lens = [len(p) + len(r) for p, r in encoded]
        width = max(seq_lens)
        pad = pad_id(self.tokenizer)
        rows = []
        for p, r in encoded:
            fill = [pad] * (width - len(p) - len(r))
            rows.append(fill + p + r if left else p + r + fill)
        input_ids = torch.tensor(rows, device=self.device)
        pos = torch.arange(width, device=self.device)[None, :]
        seq = torch.tensor(seq_lens, device=self.device)[:, None]
        attention = pos >= width - seq if left else pos < seq
        position_ids = (attention.long().cumsum(-1) - 1).clamp_min(0)  # 0..len-1 over each row's real tokens
        resp = response_mask(prompt_lens, seq_lens, width, left).to(self.device)
        eot = resp & (pos >= (width if left else seq) - num_eot)  # the last num_eot response tokens
        start = width - seq if left else torch.zeros_like(seq)
        wants = torch.tensor(with_prompt, device=self.device)[:, None]
        prompt_scored = attention & ~resp & (pos > start) & wants  # prompt tokens after each row's first

        # logits at t predict token t + 1: keep only the tail that holds every row's predicting positions
        first = min((width - s if left else 0) + (0 if whole else p - 1)
                    for p, s, whole in zip(prompt_lens, seq_lens, with_prompt))
        keep = width - first
        kwargs = dict(input_ids=input_ids, attention_mask=attention.long(), position_ids=position_ids,
                      use_cache=False, output_hidden_states=bool(layers))
        if self._accepts_logits_to_keep():
            kwargs["logits_to_keep"] = keep
        out = self.model(**kwargs)
        hidden_states = out.hidden_states if layers else None
        logits = out.logits[:, out.logits.shape[1] - keep:]  # (B, keep, V) whether or not the model sliced
        del out
        def predicted_at(mask):  # the positions whose logits predict the masked tokens, within the kept tail
            shifted = torch.zeros_like(mask)
            shifted[:, :-1] = mask[:, 1:]
            return shifted[:, width - keep:]

        predicting = predicted_at(resp | prompt_scored)
        targets = input_ids[:, width - keep + 1:]
        targets = torch.cat([targets, targets.new_full((len(rows), 1), pad)], dim=1)  # last column never predicts
        row_of = torch.arange(len(rows), device=self.device)[:, None].expand_as(predicting)[predicting]
        token_lp = token_logprobs(logits[predicting], targets[predicting]).double()
        del logits

        def row_sums(mask):
            part = predicted_at(mask)[predicting]
            return torch.zeros(len(rows), dtype=torch.float64, device=self.device).index_add_(
                0, row_of[part], token_lp[part]).tolist()

        logp, eot_logp, prompt_logp = row_sums(resp), row_sums(eot), row_sums(prompt_scored)

        pooled = {}
        counts = resp.sum(1, keepdim=True).float()
        for layer in layers:
            h = hidden_states[layer]
            total = torch.where(resp[..., None], h, h.new_zeros(())).sum(1, dtype=torch.float32)  # NaN-safe on padding
            pooled[layer] = (total / counts).cpu().numpy()
        return [ScoreResult(logp=logp[b], num_tokens=len(encoded[b][1]),
                            pooled={layer: pooled[layer][b].copy() for layer in layers},
                            end_of_turn_logp=eot_logp[b], end_of_turn_tokens=num_eot,
                            prompt_logp=prompt_logp[b] if with_prompt[b] else None,
                            prompt_tokens=prompt_lens[b] if with_prompt[b] else 0)
                for b in range(len(rows))]

    def _accepts_logits_to_keep(self) -> bool:
        if not hasattr(self, "_logits_to_keep"):
            self._logits_to_keep = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        return self._logits_to_keep
