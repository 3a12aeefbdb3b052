"""Sequence-classification reward models (e.g. an English RM applied to every language)."""

from __future__ import annotations

import torch

from rayalign.models import _quiet_transformers, load_tokenizer, torch_dtype


class RewardModelEngine:
    def __init__(self, model_path: str, *, dtype: str = "auto", device: str | None = None, batch_size: int = 16,
                 trust_remote_code: bool = False):
        from transformers import AutoModelForSequenceClassification

        _quiet_transformers()
        self.model_path = model_path
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.batch_size = batch_size
        self.tokenizer = load_tokenizer(model_path, trust_remote_code)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            model_path, dtype=torch_dtype(dtype, self.device), trust_remote_code=trust_remote_code).to(self.device).eval()
        if self.model.config.num_labels != 1:
            raise ValueError(f"{model_path}: a reward model has one output (num_labels = 1), this one has "
                             f"{self.model.config.num_labels}")
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id

    @torch.inference_mode()
    def score(self, prompts: list[list[dict]], responses: list[str]) -> list[float]:
        """Scalar reward of each (chat prompt, response), the chat template applied."""
        ids = [self.tokenizer.apply_chat_template(p + [{"role": "assistant", "content": r}], tokenize=True,
                                                  return_dict=False) for p, r in zip(prompts, responses)]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out = [0.0] * len(ids)
        pad = self.model.config.pad_token_id
        for start in range(0, len(order), self.batch_size):
            chunk = order[start: start + self.batch_size]
            width = max(len(ids[i]) for i in chunk)
            input_ids = torch.tensor([ids[i] + [pad] * (width - len(ids[i])) for i in chunk], device=self.device)
            mask = torch.tensor([[1] * len(ids[i]) + [0] * (width - len(ids[i])) for i in chunk], device=self.device)
            logits = self.model(input_ids=input_ids, attention_mask=mask).logits[:, 0].float().cpu()
            for i, value in zip(chunk, logits.tolist()):
                out[i] = value
        return out
