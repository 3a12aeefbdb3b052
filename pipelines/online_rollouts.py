"""Each online step's rollouts from the generation engines, synchronous or one step off the policy.

Synchronous: a step's rollouts are generated when the step asks for them, by the engines holding the trainer's
latest weights. With `online.async_train`, the next step's rollouts are generated in a background thread while
this step trains (verl's one-step-off policy, OpenRLHF's async training): the engines still hold the weights
before this step's update, so a step trains on rollouts of the policy one update behind. The engine that
generated records their per-token log-probs (the behaviour policy) before it takes newer weights, and the
trainer's importance ratio uses them: the clip corrects the lag.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

PENDING_FILE = "rollouts-next.parquet"  # in the policy checkpoint: the next step's rollouts, already generated
STEP_KEY = b"rayalign.step"


@dataclass
class StepRollouts:
    step: int
    samples: pa.Table
    sequences: list  # (prompt ids, response ids): the tokens the engine generated
    behaviour: list | None  # per-token log-probs of the generating engine (async_train), else None


class Rollouts:
    def __init__(self, cfg, generators, prompts: pa.Table, policy_path: str):
        from rayalign.models import load_tokenizer

        self.cfg, self.generators, self.prompts = cfg, generators, prompts
        self.one_step_off = cfg.online.async_train
        self.tokenizer = load_tokenizer(policy_path, cfg.policy.trust_remote_code)  # used by one thread at a time
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="rollouts") if self.one_step_off else None
        self.next: Future | StepRollouts | None = None

    def generate(self, step: int) -> StepRollouts:
        from rayalign.actors.pool import split_shards
        from rayalign.training.rollouts import step_prompts

        cfg = self.cfg
        batch = step_prompts(self.prompts, step, cfg.online.prompts_per_step, cfg.sampling.seed)
        shards = split_shards(batch, cfg.engines.shard_rows)
        samples = self.generators.gather(shards, cfg.sampling, step, f"online-step-{step - 1}", token_ids=True)
        sequences = generated_sequences(self.tokenizer, samples)
        samples = samples.drop_columns(["response_ids"])
        behaviour = self.generators.token_logps(sequences) if self.one_step_off else None
        return StepRollouts(step, samples, sequences, behaviour)

    def take(self, step: int) -> tuple[StepRollouts, float]:
        """The step's rollouts and the seconds spent waiting for them; one step off, the next step's generation
        starts here (the engines hold the weights before this step's update)."""
        started = time.perf_counter()
        ready = self.next.result() if isinstance(self.next, Future) else self.next
        self.next = None
        if ready is None or ready.step != step:
            ready = self.generate(step)
        if self.one_step_off and step < self.cfg.online.steps:
            self.next = self.pool.submit(self.generate, step + 1)
        return ready, time.perf_counter() - started

    def settle(self) -> None:
        """Wait for the next step's rollouts (and their behaviour log-probs) before the engines take new weights."""
        if isinstance(self.next, Future):
            self.next = self.next.result()

    def save_pending(self, directory: Path) -> None:
        """Write the next step's rollouts (already generated, with their behaviour log-probs) into a checkpoint, so
        that a relaunch trains on the very rollouts an uninterrupted run would."""
        self.settle()
        if self.next is None:
            return
        table = self.next.samples.append_column("response_ids", pa.array([r for _, r in self.next.sequences],
                                                                          pa.list_(pa.int32())))
        table = table.append_column("behaviour_logp", pa.array(self.next.behaviour, pa.list_(pa.float64())))
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), STEP_KEY: str(self.next.step).encode()})
        pq.write_table(table, Path(directory) / PENDING_FILE)

    def load_pending(self, directory: Path, step: int) -> None:
        """Take the next step's rollouts saved by `save_pending` in the checkpoint that a relaunch resumes from."""
        from rayalign.config import ConfigError

        if not self.one_step_off or step > self.cfg.online.steps:
            return
        path = Path(directory) / PENDING_FILE
        if not path.is_file():
            raise ConfigError(f"{path}: missing; online.async_train resumes only from a checkpoint of an "
                              "online.async_train run (it holds the next step's rollouts); use another --run-dir")
        table = pq.read_table(path)
        metadata = dict(table.schema.metadata or {})
        saved = int(metadata.pop(STEP_KEY, b"0"))
        if saved != step:
            raise ConfigError(f"{path}: holds step {saved}'s rollouts, not step {step}'s")
        behaviour = table.column("behaviour_logp").to_pylist()
        sequences = generated_sequences(self.tokenizer, table)
        samples = table.drop_columns(["response_ids", "behaviour_logp"]).replace_schema_metadata(metadata or None)
        self.next = StepRollouts(step, samples, sequences, behaviour)

    def close(self) -> None:
        """Stop taking work; a generation still running ends when the engines are shut down."""
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)


def generated_sequences(tokenizer, samples: pa.Table) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids) of each rollout: the templated prompt, then exactly the tokens the engine
    generated (re-encoding the decoded text would give other tokens where a byte-level BPE's merges or a split
    multi-byte character differ, and the update would then reinforce sequences nobody sampled)."""
    prompts = [list(tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=True, return_dict=False))
               for m in samples.column("messages").to_pylist()]
    return list(zip(prompts, samples.column("response_ids").to_pylist()))
