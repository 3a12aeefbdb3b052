"""Online RL on TrainerGroups: the policy (clipped policy-gradient updates with a KL penalty to a frozen
reference) and, for PPO, a critic (the policy's body with a per-token value head). Every rank gets the whole
rollout mini-batch and takes its slice."""

from __future__ import annotations

import time

from rayalign.actors.trainer import TrainerActor, TrainerGroup


class RolloutTrainer(TrainerActor):
    """What the policy and the critic share: this rank's micro-batches of a rollout batch."""

    def _batches(self, sequences: list):
        """(rows, tensors) of this rank's micro-batches of a rollout batch (each rank takes its slice)."""
        from rayalign.models import pad_id
        from rayalign.training.data import TrainingData, collate, micro_batch

        data = TrainingData("rollouts", [[s] for s in sequences], {}, [""] * len(sequences), [""] * len(sequences))
        pad = pad_id(self.tokenizer)
        for m in range(len(data) // (self.t.micro_batch_size * self.t.world_size)):  # a mini-batch or a whole step's
            rows = micro_batch(list(range(len(data))), self.rank, m, self.t.world_size, self.t.micro_batch_size)
            yield rows, {k: v.to(self.device) for k, v in collate(data, rows, pad).items()}

    def _per_token(self, sequences: list, columns) -> list[dict]:
        """{"row", name: per-response-token values} of this rank's rows, `columns(batch, mask)` computed without
        gradients."""
        import torch

        out = []
        with torch.no_grad():
            for rows, b in self._batches(sequences):
                mask = b["loss_mask"]
                values = columns(b, mask)
                out += [{"row": r, **{k: v[i][mask[i]].tolist() for k, v in values.items()}} for i, r in enumerate(rows)]
        return out


class PolicyTrainer(RolloutTrainer):
    def prepare(self, total_steps: int, reference_path: str) -> dict:
        """The DeepSpeed engine for `total_steps` updates and a frozen reference (the starting policy)."""
        from rayalign.models import load_causal_lm

        self._init_engine(total_steps)
        self.reference = load_causal_lm(reference_path, "bfloat16" if self.on_gpu else "float32", self.device,
                                        self.model_cfg.trust_remote_code).requires_grad_(False)
        return {"global_batch": self.ds_config["train_batch_size"]}

    def rollout_stats(self, sequences: list) -> list[dict]:
        """Per response token, without gradients: the policy's and the reference's log-probs, for this rank's slice
        of the batch (RolloutGroup.rollout_stats joins the slices)."""
        from rayalign.training.data import token_logps

        return self._per_token(sequences, lambda b, mask: {
            "logp": token_logps(self.engine, b["input_ids"], b["attention_mask"], mask),
            "ref_logp": token_logps(self.reference, b["input_ids"], b["attention_mask"], mask)})

    def update(self, sequences: list, advantages: list, old_logps: list, ref_logps: list, kl_coef: float,
                kl_estimator: str, clip_eps: float) -> dict:
        """One optimizer update on a mini-batch of rollouts (every rank gets the mini-batch and takes its slice):
        PPO clipped surrogate against the behaviour policy's log-probs plus a KL penalty to the reference.

        `advantages`: one per sequence (GRPO, RLOO) or one list per sequence with a value per response token (PPO
        with GAE); `old_logps`, `ref_logps`: per response token, recorded before the step's first update
        (`rollout_stats`), so the ratio is 1 on the first update and moves on later mini-batches and epochs."""
        import torch
        import torch.distributed as dist

        from rayalign.engines.hf import token_logprobs
        from rayalign.losses.rl import kl_penalty_loss, masked_mean, ppo_policy_loss, token_entropy

        if len(sequences) != self.ds_config["train_batch_size"]:
            raise ValueError(f"update: {len(sequences)} sequences, expected the mini-batch "
                             f"{self.ds_config['train_batch_size']}")
        started, lr = time.perf_counter(), self.scheduler.get_last_lr()[0]
        keys = ("policy_loss", "kl", "clip_fraction", "approx_kl", "entropy")
        sums = torch.zeros(len(keys) + 1, dtype=torch.float64)  # the metrics, then micro-batches

        def per_token(rows, values):  # lists of per-token values -> (B, T) on the response positions
            out = torch.zeros(mask.shape, dtype=torch.float32, device=self.device)
            out[mask] = torch.tensor([x for r in rows for x in values[r]], dtype=torch.float32, device=self.device)
            return out

        for rows, b in self._batches(sequences):
            mask = b["loss_mask"]
            if isinstance(advantages[0], (list, tuple)):
                adv = per_token(rows, advantages)
            else:
                adv = torch.tensor([advantages[r] for r in rows], dtype=torch.float32, device=self.device)
            logits = self.engine(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
            predicting = mask[:, 1:]  # logits at t predict token t + 1
            logp = torch.zeros(mask.shape, dtype=torch.float32, device=self.device)
            logp[:, 1:][predicting] = token_logprobs(logits[:, :-1][predicting], b["input_ids"][:, 1:][predicting])
            pg, metrics = ppo_policy_loss(logp, per_token(rows, old_logps), adv, mask, clip_eps=clip_eps)
            kl, kl_metrics = kl_penalty_loss(logp, per_token(rows, ref_logps), mask, coef=kl_coef, kind=kl_estimator)
            with torch.no_grad():
                entropy = torch.zeros(mask.shape, dtype=torch.float32, device=self.device)
                entropy[:, 1:][predicting] = token_entropy(logits[:, :-1][predicting])
                metrics["entropy"] = masked_mean(entropy, mask).item()
            self.backward_step(pg + kl, "policy")
            metrics |= {"policy_loss": float(pg.detach()), "kl": kl_metrics["kl"]}
            sums += torch.tensor([metrics[k] for k in keys] + [1.0], dtype=torch.float64)
        sums = sums.to(self.device)
        dist.all_reduce(sums)
        sums = sums.cpu().tolist()
        self.step += 1
        record = {"step": self.step, "lr": lr, **{k: sums[i] / sums[-1] for i, k in enumerate(keys)},
                  "seconds": round(time.perf_counter() - started, 4)}
        norm = self.engine.get_global_grad_norm()
        if norm is not None:
            record["grad_norm"] = float(norm)
        return record


class CriticTrainer(RolloutTrainer):
    def _load_model(self, dtype: str):
        """The policy's body with a per-token value head, initialised from training.seed (the same on every rank
        and in every run of the recipe)."""
        import torch
        from transformers import AutoModelForTokenClassification

        from rayalign.models import disable_dropout, torch_dtype

        torch.manual_seed(self.t.seed)
        return disable_dropout(AutoModelForTokenClassification.from_pretrained(
            self.model_path, num_labels=1, dtype=torch_dtype(dtype, self.device),
            trust_remote_code=self.model_cfg.trust_remote_code).to(self.device))

    def prepare(self, total_steps: int, reference_path: str | None = None) -> dict:
        """The DeepSpeed engine for `total_steps` value updates."""
        self._init_engine(total_steps)
        return {"global_batch": self.ds_config["train_batch_size"]}

    def _token_values(self, model, b):
        """Critic values aligned like log-probs: at each response token, the value of the state before it."""
        import torch

        values = torch.zeros(b["input_ids"].shape, dtype=torch.float32, device=self.device)
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[..., 0].float()
        values[:, 1:] = torch.where(b["loss_mask"][:, 1:], out[:, :-1], 0.0)
        return values

    def rollout_stats(self, sequences: list) -> list[dict]:
        """The critic's value at each response token, without gradients, for this rank's slice of the batch."""
        return self._per_token(sequences, lambda b, mask: {"value": self._token_values(self.engine, b)})

    def update(self, sequences: list, returns: list, old_values: list, clip_eps: float) -> dict:
        """One value-function update toward the GAE returns (clipped around the rollout's values)."""
        import torch
        import torch.distributed as dist

        from rayalign.losses.rl import value_loss

        sums = torch.zeros(2, dtype=torch.float64)
        for rows, b in self._batches(sequences):
            mask = b["loss_mask"]
            values = self._token_values(self.engine, b)
            ret, old = torch.zeros_like(values), torch.zeros_like(values)
            ret[mask] = torch.tensor([x for r in rows for x in returns[r]], device=self.device)
            old[mask] = torch.tensor([x for r in rows for x in old_values[r]], device=self.device)
            loss, _ = value_loss(values, old, ret, mask, clip_eps=clip_eps)
            self.backward_step(loss, "value")
            sums += torch.tensor([float(loss.detach()), 1.0], dtype=torch.float64)
        sums = sums.to(self.device)
        dist.all_reduce(sums)
        self.step += 1
        return {"value_loss": float(sums[0] / sums[1])}


class RolloutGroup(TrainerGroup):
    def prepare(self, total_steps: int, reference_path: str | None = None) -> dict:
        return self._all("prepare", total_steps, reference_path)[0]

    def rollout_stats(self, sequences: list) -> list[dict]:
        """Per-token log-probs (policy) or values (critic) of every sequence, in order."""
        rows = sorted((r for part in self._all("rollout_stats", sequences) for r in part), key=lambda r: r["row"])
        assert [r["row"] for r in rows] == list(range(len(sequences)))
        return rows

    def update(self, *batch) -> dict:
        """One optimizer update on a mini-batch (see the actor's `update`); rank 0's metrics."""
        return self._all("update", *batch)[0]


class PolicyGroup(RolloutGroup):
    actor_class = PolicyTrainer


class CriticGroup(RolloutGroup):
    actor_class = CriticTrainer
