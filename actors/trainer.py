"""TrainerGroup: W Ray actors forming one DeepSpeed job (OpenRLHF's layout), trained with coarse verbs.

The driver calls `fit`, `save` and `state`; tensors never leave the actors. Rank 0 picks the master
address and port; every rank reads the same preference dataset and takes its slice of each global batch
(`rayalign.training.data.batch_plan`). CPU actors use DeepSpeed's CPU accelerator with gloo, in fp32; GPU actors
use NCCL and bf16.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Callable

import ray

from rayalign.config import ModelConfig, TrainingConfig

TRAIN_LOG = "train_log.jsonl"


def deepspeed_config(t: TrainingConfig, on_gpu: bool) -> dict:
    return {
        "train_batch_size": t.micro_batch_size * t.gradient_accumulation * t.world_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation,
        "gradient_clipping": t.max_grad_norm,
        "zero_optimization": {"stage": t.zero_stage},
        "zero_allow_untested_optimizer": True,  # torch AdamW: the same optimizer on CPU and GPU
        "bf16": {"enabled": on_gpu},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def warmup_cosine(total_steps: int, warmup_ratio: float) -> Callable[[int], float]:
    """Learning-rate factor: linear warmup over ceil(ratio * total) steps, then cosine decay to 0."""
    warmup = math.ceil(total_steps * warmup_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


class CheckpointError(RuntimeError):
    """A training checkpoint that cannot be loaded; the message names the file."""


def deepspeed_checkpoint_globals() -> list:
    """The non-tensor types DeepSpeed writes into its checkpoints (plain data classes and an enum, rebuilt from their
    fields without calling anything else), allowed when loading them with weights_only."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


class TrainerActor:
    """One DeepSpeed rank."""

    def __init__(self, rank: int, model_path: str, model: ModelConfig, training: TrainingConfig, dco_beta: float,
                 role: str = "policy"):
        self.rank, self.model_path, self.model_cfg, self.t, self.dco_beta = rank, model_path, model, training, dco_beta
        self.role = role  # "policy", or "critic": the policy's body with a per-token value head (PPO)
        self.on_gpu = training.num_gpus > 0
        self.engine = None
        self.step = 0

    def master(self) -> tuple[str, int]:
        import socket

        with socket.socket() as s:
            s.bind(("", 0))
            return ray.util.get_node_ip_address(), s.getsockname()[1]

    def setup(self, master_addr: str, master_port: int) -> str:
        """Join the process group and load the policy."""
        import torch

        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(self.rank),
                          WORLD_SIZE=str(self.t.world_size), LOCAL_RANK="0")
        if not self.on_gpu:
            os.environ["DS_ACCELERATOR"] = "cpu"
        torch.set_num_threads(max(1, int(self.t.num_cpus)))
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if self.on_gpu else "gloo")
        from rayalign.models import load_causal_lm, load_tokenizer

        self.device = "cuda" if self.on_gpu else "cpu"
        self.ds_config = deepspeed_config(self.t, self.on_gpu)
        if self.t.zero_stage == 3:  # partition the weights while loading (kept alive while the model lives)
            from transformers.integrations import HfDeepSpeedConfig

            self._hf_ds = HfDeepSpeedConfig(self.ds_config)
        dtype = "bfloat16" if self.on_gpu else "float32"
        if self.role == "critic":
            from transformers import AutoModelForTokenClassification

            from rayalign.models import torch_dtype

            self.model = AutoModelForTokenClassification.from_pretrained(
                self.model_path, num_labels=1, dtype=torch_dtype(dtype, self.device),
                trust_remote_code=self.model_cfg.trust_remote_code).to(self.device)
        else:
            self.model = load_causal_lm(self.model_path, dtype, self.device, self.model_cfg.trust_remote_code)
        if self.t.gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        self.model.train()
        self.tokenizer = load_tokenizer(self.model_path, self.model_cfg.trust_remote_code)
        return ray.util.get_node_ip_address()

    def prepare(self, data_path: str, schema: str, loss: str, aligned_languages: list[str] | None) -> dict:
        """Read and encode the preference dataset, then build the DeepSpeed engine for its steps."""
        import deepspeed
        import torch

        from rayalign.data.store import read_dataset
        from rayalign.training.data import REFERENCE_FREE, encode_dataset

        t = self.t
        self.loss, self.aligned = loss, aligned_languages
        self.data = encode_dataset(read_dataset(data_path, schema), schema, self.tokenizer, max_length=t.max_length,
                                   needs_reference=loss not in REFERENCE_FREE, source=data_path)
        self.global_batch = self.ds_config["train_batch_size"]
        self.steps_per_epoch = len(self._plan(0))
        total = self.steps_per_epoch * t.epochs
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total, t.warmup_ratio))
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.model, optimizer=optimizer, lr_scheduler=schedule, config=self.ds_config)
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
                self.engine.backward(loss)
                self.engine.step()
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

    def prepare_online(self, total_steps: int, reference_path: str) -> dict:
        """Online RL: the DeepSpeed engine for `total_steps` updates and a frozen reference (the starting policy)."""
        import deepspeed
        import torch

        from rayalign.models import load_causal_lm

        t = self.t
        optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=t.lr,
                                      weight_decay=t.weight_decay)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total_steps, t.warmup_ratio))
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.model, optimizer=optimizer, lr_scheduler=schedule, config=self.ds_config)
        if self.role == "policy":
            self.reference = load_causal_lm(reference_path, "bfloat16" if self.on_gpu else "float32", self.device,
                                            self.model_cfg.trust_remote_code).requires_grad_(False)
        return {"global_batch": self.ds_config["train_batch_size"]}

    def _batches(self, sequences: list):
        """(rows, tensors) of this rank's micro-batches of a rollout batch (each rank takes its slice)."""
        from rayalign.models import pad_id
        from rayalign.training.data import TrainingData, collate, micro_batch

        data = TrainingData("rollouts", [[s] for s in sequences], {}, [""] * len(sequences), [""] * len(sequences))
        pad = pad_id(self.tokenizer)
        for m in range(self.t.gradient_accumulation):
            rows = micro_batch(list(range(len(data))), self.rank, m, self.t.world_size, self.t.micro_batch_size)
            yield rows, {k: v.to(self.device) for k, v in collate(data, rows, pad).items()}

    def _token_values(self, model, b):
        """Critic values aligned like log-probs: at each response token, the value of the state before it."""
        import torch

        values = torch.zeros(b["input_ids"].shape, dtype=torch.float32, device=self.device)
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[..., 0].float()
        values[:, 1:] = torch.where(b["loss_mask"][:, 1:], out[:, :-1], 0.0)
        return values

    def rollout_stats(self, sequences: list) -> list[dict]:
        """Per response token, without gradients: the policy's and the reference's log-probs (policy role) or the
        critic's values, for this rank's slice of the batch (TrainerGroup.rollout_stats joins the slices)."""
        import torch

        from rayalign.training.data import token_logps

        out = []
        with torch.no_grad():
            for rows, b in self._batches(sequences):
                mask = b["loss_mask"]
                if self.role == "critic":
                    columns = {"value": self._token_values(self.engine, b)}
                else:
                    columns = {"logp": token_logps(self.engine, b["input_ids"], b["attention_mask"], mask),
                               "ref_logp": token_logps(self.reference, b["input_ids"], b["attention_mask"], mask)}
                for i, r in enumerate(rows):
                    out.append({"row": r, **{k: v[i][mask[i]].tolist() for k, v in columns.items()}})
        return out

    def critic_step(self, sequences: list, returns: list, old_values: list, clip_eps: float) -> dict:
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
            self.engine.backward(loss)
            self.engine.step()
            sums += torch.tensor([float(loss.detach()), 1.0], dtype=torch.float64)
        sums = sums.to(self.device)
        dist.all_reduce(sums)
        self.step += 1
        return {"value_loss": float(sums[0] / sums[1])}

    def rl_step(self, sequences: list, advantages: list, old_logps: list, ref_logps: list, kl_coef: float,
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
            raise ValueError(f"rl_step: {len(sequences)} sequences, expected the mini-batch "
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
            self.engine.backward(pg + kl)
            self.engine.step()
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

    def checkpoint(self, directory: str) -> int:
        """A resumable DeepSpeed checkpoint (weights, optimizer, schedule, step); every rank writes its part."""
        self.engine.save_checkpoint(directory, tag=f"step-{self.step}", client_state={"step": self.step})
        return self.step

    def resume(self, directory: str) -> int:
        """Load the latest checkpoint in `directory`; the next step continues the same data order.

        Every file is read with torch.load(weights_only=True): tensors, containers and DeepSpeed's enums only,
        never arbitrary pickled objects (DeepSpeed's own loader would unpickle anything)."""
        import pickle

        import torch

        engine = self.engine.checkpoint_engine
        loader = engine.load

        def load_weights_only(path, map_location=None):
            try:
                with torch.serialization.safe_globals(deepspeed_checkpoint_globals()):
                    return torch.load(path, map_location=map_location, weights_only=True)
            except pickle.UnpicklingError as e:
                raise CheckpointError(f"{path}: holds objects other than weights; not loaded ({e})") from None

        engine.load = load_weights_only
        try:
            path, client = self.engine.load_checkpoint(directory)
        finally:
            engine.load = loader
        if path is None:
            raise CheckpointError(f"{directory}: no DeepSpeed checkpoint to resume from")
        self.step = int(client["step"])
        return self.step

    def save(self, path: str) -> None:
        """Hugging Face checkpoint with the tokenizer, written by rank 0 (ZeRO-3 shards gathered first)."""
        import deepspeed
        import torch.distributed as dist

        module = self.engine.module
        state = {}
        for name, param in module.named_parameters():
            if self.t.zero_stage == 3:
                with deepspeed.zero.GatheredParameters([param]):
                    if self.rank == 0:
                        state[name] = param.detach().cpu().clone()
            elif self.rank == 0:
                state[name] = param.detach().cpu()
        if self.rank == 0:
            import shutil

            out = Path(path)
            tmp = out.with_name(out.name + ".tmp")
            if tmp.is_dir():  # left by an interrupted save
                shutil.rmtree(tmp)
            elif tmp.exists():
                tmp.unlink()
            tmp.mkdir(parents=True)
            module.save_pretrained(tmp, state_dict=state, safe_serialization=True)
            self.tokenizer.save_pretrained(tmp)
            if out.exists():
                shutil.rmtree(out)
            tmp.rename(out)
        dist.barrier()

    def parameters(self) -> dict:
        """Full parameters as numpy arrays (for tests and weight sync); under ZeRO-3 every rank must call it."""
        import deepspeed

        out = {}
        for name, param in self.engine.module.named_parameters():
            with deepspeed.zero.GatheredParameters([param], enabled=self.t.zero_stage == 3):
                out[name] = param.detach().float().cpu().numpy().copy()
        return out

    def publish_weights(self) -> list:
        """Put the full parameters into the object store from this actor (rank 0; every rank joins the ZeRO-3
        gathers) and return [ref]: engines fetch them from here, and the driver never holds them."""
        weights = self.parameters()
        return [ray.put(weights)] if self.rank == 0 else []

    def state(self) -> dict:
        return {"rank": self.rank, "step": self.step, "node": ray.util.get_node_ip_address(),
                "steps_per_epoch": getattr(self, "steps_per_epoch", None)}


class TrainerGroup:
    """W TrainerActors in one PACK placement group, ranks 0..W-1 of one DeepSpeed job."""

    def __init__(self, model_path: str, model: ModelConfig, training: TrainingConfig, dco_beta: float = 1.0,
                 role: str = "policy"):
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from rayalign.actors.pool import wait_started

        t = training
        bundle = {"CPU": t.num_cpus, **({"GPU": t.num_gpus} if t.num_gpus else {})}
        self.placement = placement_group([bundle] * t.world_size, strategy="PACK")
        wait_started([self.placement.ready()], f"placement groups of {t.world_size} trainer rank(s)", bundle)
        remote = ray.remote(TrainerActor)
        env = {"env_vars": {"DS_ACCELERATOR": "cpu"}} if not t.num_gpus else {}
        self.actors = [remote.options(
            num_cpus=t.num_cpus, num_gpus=t.num_gpus, runtime_env=env,
            scheduling_strategy=PlacementGroupSchedulingStrategy(self.placement, placement_group_bundle_index=rank),
        ).remote(rank, model_path, model, training, dco_beta, role) for rank in range(t.world_size)]
        addr, port = ray.get(self.actors[0].master.remote())
        self.nodes = ray.get([a.setup.remote(addr, port) for a in self.actors])

    def _all(self, verb: str, *args):
        return ray.get([getattr(a, verb).remote(*args) for a in self.actors])

    def fit(self, data_path: str, schema: str, loss: str, *, aligned_languages: list[str] | None = None,
            checkpoint_dir: str | None = None, checkpoint_every: int = 0,
            progress: Callable[[int, int, dict], None] | None = None,
            on_checkpoint: Callable[[Path], None] | None = None) -> dict:
        """Train on a preference dataset; resume from `checkpoint_dir` if it holds a checkpoint (the caller decides
        whether to trust it). Each checkpoint holds the steps' log so far (train_log.jsonl), so a resumed run's
        log is whole; `on_checkpoint(tag_dir)` is called after each one is written.

        Returns {"prepare": ..., "steps": [per-step metrics, from step 1], "resumed_from": step}."""
        import json

        info = self._all("prepare", data_path, schema, loss, aligned_languages)[0]
        resumed, history = 0, []
        if checkpoint_dir and (Path(checkpoint_dir) / "latest").is_file():
            resumed = self._all("resume", checkpoint_dir)[0]
            log = Path(checkpoint_dir) / f"step-{resumed}" / TRAIN_LOG
            if log.is_file():
                history = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()]
        total = info["steps"]
        for step in range(resumed, total):
            record = self._all("train_steps", 1)[0][0]
            history.append(record)
            if checkpoint_dir and checkpoint_every and record["step"] % checkpoint_every == 0 and record["step"] < total:
                self._all("checkpoint", checkpoint_dir)
                tag_dir = Path(checkpoint_dir) / f"step-{record['step']}"
                (tag_dir / TRAIN_LOG).write_text("".join(json.dumps(r) + "\n" for r in history), encoding="utf-8")
                if on_checkpoint:
                    on_checkpoint(tag_dir)
            if progress:
                progress(record["step"], total, record)
        return {"prepare": info, "steps": history, "resumed_from": resumed}

    def save(self, path: str) -> None:
        """Save the policy; a file that cannot be written (disk full) raises DatasetWriteError naming it."""
        from rayalign.data.store import DatasetWriteError

        try:
            self._all("save", path)
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, OSError):
                raise DatasetWriteError(f"{path}: the trained policy could not be saved ({e.cause}); launch again to "
                                        "resume from the latest checkpoint") from None
            raise

    def rollout_stats(self, sequences: list) -> list[dict]:
        """Per-token log-probs (policy) or values (critic) of every sequence, in order."""
        rows = sorted((r for part in self._all("rollout_stats", sequences) for r in part), key=lambda r: r["row"])
        assert [r["row"] for r in rows] == list(range(len(sequences)))
        return rows

    def state(self) -> list[dict]:
        return self._all("state")

    def parameters(self) -> dict:
        return self._all("parameters")[0]  # every rank takes part in the ZeRO-3 gathers

    def publish_weights(self) -> "ray.ObjectRef":
        """The full parameters as an object in the store, put there by rank 0 (see TrainerActor.publish_weights)."""
        return self._all("publish_weights")[0][0]

    def shutdown(self) -> None:
        from ray.util.placement_group import remove_placement_group

        for a in self.actors:
            ray.kill(a)
        remove_placement_group(self.placement)

