"""TrainerGroup: W Ray actors forming one DeepSpeed job (OpenRLHF's layout), driven with coarse verbs.

The shared machinery of every role: process group, model, DeepSpeed engine, checkpoints, saving and weights.
The roles live beside it: preference training (preference_trainer.py), the RL policy and critic
(rl_trainer.py). Tensors never leave the actors. Rank 0 picks the master
address and port; every rank reads the same preference dataset and takes its slice of each global batch
(`rayalign.training.data.batch_plan`). CPU actors use DeepSpeed's CPU accelerator with gloo, in fp32; GPU actors
use NCCL and bf16.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable

import ray

from rayalign import failures
from rayalign.failures import CheckpointError
from rayalign.config import ModelConfig, TrainingConfig

TrainerLostError = failures.TrainerLostError  # kept importable here; defined there so the CLI catches it without Ray

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


def deepspeed_checkpoint_globals() -> list:
    """The non-tensor types DeepSpeed writes into its checkpoints (plain data classes and an enum, rebuilt from their
    fields without calling anything else), allowed when loading them with weights_only."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


class TrainerActor:
    """One DeepSpeed rank: process group, model, engine, checkpoints and weights. Subclasses add a role's verbs
    (actors/preference_trainer.py: preference training; actors/rl_trainer.py: RL policy and critic)."""

    def __init__(self, rank: int, model_path: str, model: ModelConfig, training: TrainingConfig, dco_beta: float = 1.0):
        self.rank, self.model_path, self.model_cfg, self.t, self.dco_beta = rank, model_path, model, training, dco_beta
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
        from rayalign.models import load_tokenizer

        self.device = "cuda" if self.on_gpu else "cpu"
        self.ds_config = deepspeed_config(self.t, self.on_gpu)
        if self.t.zero_stage == 3:  # partition the weights while loading (kept alive while the model lives)
            from transformers.integrations import HfDeepSpeedConfig

            self._hf_ds = HfDeepSpeedConfig(self.ds_config)
        dtype = "bfloat16" if self.on_gpu else "float32"
        self.model = self._load_model(dtype)
        if self.t.gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        self.model.train()
        self.tokenizer = load_tokenizer(self.model_path, self.model_cfg.trust_remote_code)
        return ray.util.get_node_ip_address()

    def _load_model(self, dtype: str):
        from rayalign.models import disable_dropout, load_causal_lm

        return disable_dropout(load_causal_lm(self.model_path, dtype, self.device, self.model_cfg.trust_remote_code))

    def _init_engine(self, total_steps: int) -> None:
        """The DeepSpeed engine over the model, with AdamW and the warmup-cosine schedule for `total_steps`."""
        import deepspeed
        import torch

        t = self.t
        optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=t.lr,
                                      weight_decay=t.weight_decay)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total_steps, t.warmup_ratio))
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.model, optimizer=optimizer, lr_scheduler=schedule, config=self.ds_config)

    def backward_step(self, loss, what: str) -> None:
        """Backward and optimizer step on `loss`; a NaN or infinite loss on any rank stops every rank before it
        reaches the weights (the ranks agree first, so none waits in a collective the others left)."""
        import torch
        import torch.distributed as dist

        finite = torch.tensor([float(torch.isfinite(loss.detach()).all())], device=self.device)
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if not finite.item():
            raise failures.NonFiniteLossError(
                f"training: the {what} loss is not finite (NaN or infinite) at optimizer step {self.step + 1}; it "
                "was not applied and training stopped. Look for extreme rewards or log-probs in the data, lower "
                "training.lr, or train in float32 (policy.dtype); the same command resumes from the last checkpoint")
        self.engine.backward(loss)
        self.engine.step()

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

    def join_weight_group(self, host: str, port: int, world_size: int) -> list:
        """CUDA weight sync: rank 0 joins the NCCL group with the engines (as its rank 0); returns the parameters'
        (name, dtype, full shape), the order they are broadcast in."""
        from rayalign.training.weight_sync import join_group, parameter_meta

        if self.rank == 0:
            self.weight_group = join_group(host, port, 0, world_size)
        return parameter_meta(self.engine.module, self.t.zero_stage)

    def gpu(self) -> tuple:
        """(node id, GPU UUID or None): where this rank's parameters live, for the choice of weight-sync path."""
        from rayalign.training.weight_sync import device_uuid

        return ray.get_runtime_context().get_node_id(), device_uuid() if self.on_gpu else None

    def share_weights(self) -> list:
        """CUDA IPC handles of rank 0's parameters, for engines on its GPU (ZeRO 0-2: the parameters are whole)."""
        from rayalign.training.weight_sync import share_parameters

        return share_parameters(self.engine.module) if self.rank == 0 else []

    def broadcast_weights(self) -> None:
        """Send every parameter to the engines over the NCCL group (every rank joins the ZeRO-3 gathers)."""
        from rayalign.training.weight_sync import send_parameters

        send_parameters(getattr(self, "weight_group", None), self.engine.module, self.t.zero_stage, self.rank)

    def state(self) -> dict:
        return {"rank": self.rank, "step": self.step, "node": ray.util.get_node_ip_address(),
                "steps_per_epoch": getattr(self, "steps_per_epoch", None)}


WRITE_FAILURES = ("No space left on device", "StorageFull", "Disk quota exceeded", "Read-only file system",
                  "Permission denied", "file write failed", "failed writing")
TORCH_WRITER = "inline_container.cc"  # torch.save's zip writer: on a full disk, "unexpected pos 576 vs 534"


def write_failure(error: Exception) -> str | None:
    """The reason, when an actor's error is a failed write: an OSError, or a library's own error around one
    (safetensors' SafetensorError, torch.save's RuntimeError), which are not OSErrors; else None."""
    cause = getattr(error, "cause", None) or error
    text = str(cause).strip()
    if not (isinstance(cause, OSError) or any(marker in text for marker in WRITE_FAILURES + (TORCH_WRITER,))):
        return None
    lines = text.splitlines() or [type(cause).__name__]
    reason = next((line for line in lines if any(m in line for m in WRITE_FAILURES)), lines[0]).strip()[:300]
    return reason if any(m in reason for m in WRITE_FAILURES) else f"{reason}: a failed write; is the disk full?"


class TrainerGroup:
    """W trainer actors in one PACK placement group, ranks 0..W-1 of one DeepSpeed job; the role's verbs are on the
    subclasses. Use as a context manager."""

    actor_class = TrainerActor

    def __init__(self, model_path: str, model: ModelConfig, training: TrainingConfig, dco_beta: float = 1.0):
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from rayalign.actors.pool import abandon, bundle_pinning, start_actors, wait_started

        t = self.training = training
        bundle = {"CPU": t.num_cpus, **({"GPU": t.num_gpus} if t.num_gpus else {})}
        self.actors = []
        self.placement = placement_group([bundle] * t.world_size, strategy="PACK", **bundle_pinning(t.world_size))
        try:  # a rank that cannot start or load (or Ctrl-C) takes the ranks started and the placement group with it
            wait_started([self.placement.ready()], f"placement groups of {t.world_size} trainer rank(s)", bundle)
            remote = ray.remote(self.actor_class)
            env = {"env_vars": {"DS_ACCELERATOR": "cpu"}} if not t.num_gpus else {}
            self.actors = start_actors(lambda rank: remote.options(
                num_cpus=t.num_cpus, num_gpus=t.num_gpus, runtime_env=env,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.placement, placement_group_bundle_index=rank),
            ).remote(rank, model_path, model, training, dco_beta), list(range(t.world_size)), [])
            addr, port = ray.get(self.actors[0].master.remote())
            self._nodes = ray.get([a.setup.remote(addr, port) for a in self.actors])
        except BaseException:
            abandon(self.actors, [self.placement])
            raise

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def _all(self, verb: str, *args):
        return ray.get([getattr(a, verb).remote(*args) for a in self.actors])

    def checkpoint(self, directory: str) -> int:
        """Every rank writes its part of a resumable checkpoint; returns the step it holds. A checkpoint that cannot
        be written (disk full) raises DatasetWriteError naming the directory."""
        from rayalign.data.store import DatasetWriteError

        try:
            return self._all("checkpoint", directory)[0]
        except ray.exceptions.RayTaskError as e:
            if (reason := write_failure(e)) is None:
                raise
            raise DatasetWriteError(f"{directory}: the training checkpoint could not be written ({reason}); make room "
                                    "and launch again: training resumes from the last complete checkpoint") from None

    def resume(self, directory: str) -> int:
        """Load the latest checkpoint in `directory` on every rank; returns its step."""
        return self._all("resume", directory)[0]

    def save(self, path: str) -> None:
        """Save the policy; a file that cannot be written (disk full) raises DatasetWriteError naming it."""
        from rayalign.data.store import DatasetWriteError

        try:
            self._all("save", path)
        except ray.exceptions.RayTaskError as e:
            if (reason := write_failure(e)) is None:
                raise
            raise DatasetWriteError(f"{path}: the trained policy could not be saved ({reason}); make room and launch "
                                    "again: finished stages are kept, and training resumes from its last checkpoint "
                                    "(or runs again without one)") from None

    def state(self) -> list[dict]:
        return self._all("state")

    def parameters(self) -> dict:
        return self._all("parameters")[0]  # every rank takes part in the ZeRO-3 gathers

    def publish_weights(self) -> "ray.ObjectRef":
        """The full parameters as an object in the store, put there by rank 0 (see TrainerActor.publish_weights)."""
        return self._all("publish_weights")[0][0]

    def nodes(self) -> list[str]:
        """The node of each rank."""
        return list(self._nodes)

    def shutdown(self) -> None:
        from ray.util.placement_group import remove_placement_group

        for a in self.actors:
            ray.kill(a)
        remove_placement_group(self.placement)
