"""Preference training (the DPO family) on a TrainerGroup: every rank reads the same dataset and takes its slice
of each global batch (`rayalign.training.data.batch_plan`)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from rayalign.actors.trainer import TRAIN_LOG, TrainerActor, TrainerGroup
from rayalign.data.store import atomic_write_text


class PreferenceTrainer(TrainerActor):
    """A rank that trains on a preference dataset (pairs, kto or dco)."""

    def prepare(self, data_path: str, schema: str, loss: str, aligned_languages: list[str] | None) -> dict:
        """Read and encode the preference dataset, then build the DeepSpeed engine for its steps."""
        from rayalign.data.store import read_dataset
        from rayalign.training.data import REFERENCE_FREE, encode_dataset

        t = self.t
        self.loss, self.aligned = loss, aligned_languages
        self.data = encode_dataset(read_dataset(data_path, schema), schema, self.tokenizer, max_length=t.max_length,
                                   needs_reference=loss not in REFERENCE_FREE, source=data_path)
        self.global_batch = self.ds_config["train_batch_size"]
        self.steps_per_epoch = len(self._plan(0))
        total = self.steps_per_epoch * t.epochs
        self._init_engine(total)
        self.mismatched = None
        if loss == "kto" and t.kto_reference_point == "mismatched":
            self.mismatched = self._kto_mismatched_reference()
        return {"rows": len(self.data), "dropped_too_long": self.data.dropped_too_long, "steps": total,
                "steps_per_epoch": self.steps_per_epoch, "global_batch": self.global_batch}

    def _mismatched_logps(self, rows: list[int]):
        """Summed log-probs of the mismatched (x_i, y_j) sequences of `rows` under the current weights, no gradient."""
        import torch

        from rayalign.models import pad_id
        from rayalign.training.data import collate, sequence_logps

        with torch.no_grad():
            batch = {k: x.to(self.device) for k, x in collate(self.mismatched, rows, pad_id(self.tokenizer)).items()}
            return sequence_logps(self.engine, batch["input_ids"], batch["attention_mask"], batch["loss_mask"])[0]

    def _kto_mismatched_reference(self):
        """KTO's mismatched pairs with their pi_ref log-probs: the starting weights, before any step (the dataset's
        ref_logp comes from the same policy, which generated the samples)."""
        import numpy as np
        import torch

        from rayalign.training.data import kto_mismatched_data

        self.mismatched = kto_mismatched_data(self.data)
        size = self.t.micro_batch_size
        refs = [self._mismatched_logps(list(range(s, min(s + size, len(self.data)))))
                for s in range(0, len(self.data), size)]
        self.mismatched.values["ref_logp"] = torch.cat(refs).double().cpu().numpy().astype(np.float64)
        return self.mismatched

    def _kto_kl(self, micro_batches: list[list[int]]):
        """z_ref over the global batch: this rank's mismatched rows of every micro-batch, summed over the ranks."""
        import torch
        import torch.distributed as dist

        from rayalign.losses.preference import kto_reference_point

        rows = [r for mb in micro_batches for r in mb]
        policy = torch.cat([self._mismatched_logps(mb) for mb in micro_batches]).float()
        ref = torch.as_tensor(self.mismatched.values["ref_logp"][rows], dtype=torch.float32, device=policy.device)
        return kto_reference_point(policy, ref, all_reduce=dist.all_reduce)

    def _plan(self, epoch: int) -> list[list[int]]:
        from rayalign.training.data import batch_plan

        if getattr(self, "_plan_epoch", None) != epoch:
            self._plan_cache = batch_plan(self.data, self.global_batch, seed=self.t.seed, epoch=epoch,
                                          length_grouping=self.t.length_grouping, aligned_languages=self.aligned)
            self._plan_epoch = epoch
        return self._plan_cache

    def batch_rows(self, step: int) -> list[list[int]]:
        """Rows this rank trains on at optimizer step `step`, per accumulation step."""
        from rayalign.training.data import micro_batch

        batch = self._plan(step // self.steps_per_epoch)[step % self.steps_per_epoch]
        return [micro_batch(batch, self.rank, m, self.t.world_size, self.t.micro_batch_size)
                for m in range(self.t.gradient_accumulation)]

    def train_steps(self, count: int) -> list[dict]:
        """Run up to `count` optimizer steps; per step, metrics averaged over the global batch (all ranks)."""
        import torch
        import torch.distributed as dist

        from rayalign.models import pad_id
        from rayalign.training.data import METRICS, collate, compute_loss, sequence_logps

        pad = pad_id(self.tokenizer)
        results = []
        end = min(self.step + count, self.steps_per_epoch * self.t.epochs)
        while self.step < end:
            started, lr = time.perf_counter(), self.scheduler.get_last_lr()[0]
            sums = torch.zeros(2 * len(METRICS), dtype=torch.float64)
            tokens = 0
            micro_batches = self.batch_rows(self.step)
            kto_kl = self._kto_kl(micro_batches) if getattr(self, "mismatched", None) is not None else None
            for rows in micro_batches:
                batch = collate(self.data, rows, pad)
                dev = {k: x.to(self.device) for k, x in batch.items()}
                logps, counts = sequence_logps(self.engine, dev["input_ids"], dev["attention_mask"], dev["loss_mask"])
                loss, metrics = compute_loss(self.loss, logps, counts, batch, self.t, self.dco_beta, kto_kl)
                self.backward_step(loss, self.loss)
                tokens += int(batch["attention_mask"].sum())
                for i, key in enumerate(METRICS):
                    if key in metrics:
                        sums[2 * i] += metrics[key][0]
                        sums[2 * i + 1] += metrics[key][1]
            sums = torch.cat([sums, torch.tensor([tokens], dtype=torch.float64)]).to(self.device)
            dist.all_reduce(sums)
            sums = sums.cpu().tolist()
            self.step += 1
            record = {"step": self.step, "epoch": (self.step - 1) // self.steps_per_epoch,
                      "lr": lr, "tokens": int(sums[-1]),
                      "seconds": round(time.perf_counter() - started, 4)}
            norm = self.engine.get_global_grad_norm()
            if norm is not None:
                record["grad_norm"] = float(norm)
            for i, key in enumerate(METRICS):
                if sums[2 * i + 1]:
                    record[key] = sums[2 * i] / sums[2 * i + 1]
            results.append(record)
        return results


class PreferenceTrainerGroup(TrainerGroup):
    actor_class = PreferenceTrainer

    def prepare(self, data_path: str, schema: str, loss: str, aligned_languages: list[str] | None = None) -> dict:
        """Read and encode the dataset on every rank and build the engine; rank 0's summary."""
        return self._all("prepare", data_path, schema, loss, aligned_languages)[0]

    def fit(self, data_path: str, schema: str, loss: str, *, aligned_languages: list[str] | None = None,
            checkpoint_dir: str | None = None, checkpoint_every: int = 0,
            progress: Callable[[int, int, dict], None] | None = None,
            on_checkpoint: Callable[[Path], None] | None = None) -> dict:
        """Train on a preference dataset; resume from `checkpoint_dir` if it holds a checkpoint (the caller decides
        whether to trust it). Each checkpoint holds the steps' log so far (train_log.jsonl), so a resumed run's
        log is whole; `on_checkpoint(tag_dir)` is called after each one is written.

        Returns {"prepare": ..., "steps": [per-step metrics, from step 1], "resumed_from": step}."""
        import json

        info = self.prepare(data_path, schema, loss, aligned_languages)
        resumed, history = 0, []
        if checkpoint_dir and (Path(checkpoint_dir) / "latest").is_file():
            resumed = self.resume(checkpoint_dir)
            log = Path(checkpoint_dir) / f"step-{resumed}" / TRAIN_LOG
            if log.is_file():
                history = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()]
        total = info["steps"]
        for step in range(resumed, total):
            record = self._all("train_steps", 1)[0][0]
            history.append(record)
            if checkpoint_dir and checkpoint_every and record["step"] % checkpoint_every == 0 and record["step"] < total:
                self.checkpoint(checkpoint_dir)
                tag_dir = Path(checkpoint_dir) / f"step-{record['step']}"
                atomic_write_text(tag_dir / TRAIN_LOG, "".join(json.dumps(r) + "\n" for r in history))  # names it
                if on_checkpoint:
                    on_checkpoint(tag_dir)
            if progress:
                progress(record["step"], total, record)
        return {"prepare": info, "steps": history, "resumed_from": resumed}
