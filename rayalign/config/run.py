"""RunConfig, the whole recipe: its sections, the checks across sections, and the YAML loader."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import string
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from rayalign.config.fields import ConfigError, build_dataclass, config_field as _field, read_yaml_file, set_override
from rayalign.config.sections import (BEST_WORST_METHODS, ClusterConfig, EnginesConfig, LoggingConfig, ModelConfig,
                                      OnlineConfig, PairsConfig, PromptsConfig, RewardsConfig, SamplingConfig,
                                      TrainingConfig)
from rayalign.languages import ISO_639_1, language_name
from rayalign.methods import REWARD_KEY, SCHEMA, reward_enabled, schema_of

RUN_MODES = ("offline", "online")
OFFLINE_ONLY = ("iterations", "pairs", "training.loss", "training.batch_alignment", "training.backend")
PPO_ONLY = ("online.gamma", "online.lam", "online.critic_lr")


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

    def rollouts_per_step(self, prompt_rows: int | None = None) -> int:
        """An online step's rollouts: online.prompts_per_step prompt ids (at most those the prompt set's
        `prompt_rows` hold; all asked for when unknown) x languages x sampling.n."""
        ids = self.online.prompts_per_step
        if prompt_rows is not None:
            ids = min(ids, prompt_rows // len(self.languages))
        return ids * len(self.languages) * self.sampling.n

    def online_training(self, rollout_size: int):
        """The training section of an online run of `rollout_size` rollouts per step: gradient accumulation set so
        that one optimizer update takes one mini-batch (online.mini_batch_size, by default the whole rollout)."""
        t, o = self.training, self.online
        mini = o.mini_batch_size or rollout_size
        per_pass = t.micro_batch_size * t.world_size
        group = len(self.languages) * self.sampling.n
        step = (f"a step's rollout ({rollout_size // group} prompts x {len(self.languages)} languages x "
                f"n={self.sampling.n} = {rollout_size} samples)")
        if rollout_size % mini:
            raise ConfigError(f"online.mini_batch_size: {mini} does not divide {step}; choose a divisor, or change "
                              "online.prompts_per_step or sampling.n")
        if mini % per_pass:
            size = "online.mini_batch_size" if o.mini_batch_size else \
                "online.mini_batch_size (unset: the whole step, so online.prompts_per_step or sampling.n)"
            raise ConfigError(f"online: a mini-batch ({mini} rollouts: online.mini_batch_size, or {step}) must be a "
                              f"multiple of training.micro_batch_size x training.world_size = {per_pass}; change "
                              f"{size}, training.micro_batch_size or training.world_size")
        return dataclasses.replace(t, loss=None, gradient_accumulation=mini // per_pass)

    def resolved_run_dir(self) -> Path:
        return Path(self.run_dir) if self.run_dir else Path("runs") / self.name

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def config_hash(self, *, as_spelled: bool = False) -> str:
        """Hash of every setting that changes results, which a run directory's results are checked against.

        Local paths (prompts, candidates, the user reward file, centroid texts, models) hash as absolute paths, so
        a recipe named from another directory or spelled otherwise hashes the same; `as_spelled` hashes them as
        written, as runs were recorded before (`matches` accepts both).

        Left out: name, run_dir and logging (where results are recorded, not what they are), cluster (the schedule
        and the time estimate's figures), and engines.count, max_failed_share, kv_cache_gib, max_batch_tokens and
        shards_in_flight (they do not change rows). Keys added after runs were first recorded are left out while they hold their
        defaults (mode: offline, online.async_train: false, the prompts' hf: source keys, engines.max_model_len: null,
        rewards.latent.centroid_texts: null, rewards.consistency.language_pairs: anchor, pairs.truncated: keep), and the removed top-level
        reference hashes as the null it was, so those runs still resume."""
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
        for key in ("count", "max_failed_share", "kv_cache_gib", "max_batch_tokens", "shards_in_flight"):  # no row changes
            d["engines"].pop(key)  # (raising max_failed_share lets a stopped run resume)
        if d["engines"]["max_model_len"] is None:  # hashes predate the key
            d["engines"].pop("max_model_len")
        if d["rewards"]["latent"]["centroid_texts"] is None:  # hashes predate the key
            d["rewards"]["latent"].pop("centroid_texts")
        if d["pairs"]["truncated"] == "keep" or d["pairs"]["method"] not in BEST_WORST_METHODS:
            d["pairs"].pop("truncated")  # hashes predate the key, whose behaviour was keep; best-vs-worst pairs only
        if d["rewards"]["consistency"]["language_pairs"] == "anchor":  # hashes predate the key
            d["rewards"]["consistency"].pop("language_pairs")
        d["reference"] = None  # hashes predate the top-level key's removal (it was null unless set by hand)
        if not as_spelled:
            spelled = d["prompts"]["path"]
            absolute_paths(d)
            if self.pairs.method == "dco":  # DCO reads candidate sets, not the prompts
                d["prompts"]["path"] = spelled
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def matches(self, recorded_hash: str) -> bool:
        """Whether a run recorded under `recorded_hash` holds this config (its paths spelled either way)."""
        return recorded_hash in (self.config_hash(), self.config_hash(as_spelled=True))

    def models(self) -> list[tuple[str, ModelConfig]]:
        """(recipe key, ModelConfig) of every model this recipe loads."""
        r = self.rewards
        models = [("policy", self.policy),
                  ("rewards.implicit.reward_reference", r.implicit.enabled and r.implicit.reward_reference),
                  ("rewards.reward_model.model", r.reward_model.enabled and r.reward_model.model),
                  ("rewards.consistency.reference", r.consistency.enabled and r.consistency.reference)]
        return [(key, m) for key, m in models if m]

    def validate(self) -> None:
        for key, text in _strings(dataclasses.asdict(self)):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise ConfigError(f"{key}: holds a lone surrogate (such as \\ud800), which is not text") from None
        if any(part in ("", ".", "..") for part in self.name.split("/")) or any(c in self.name for c in "\\\0") \
                or any(ord(c) < 32 for c in self.name):
            raise ConfigError(f"name: {self.name!r} is not a run name: the run directory runs/<name> must stay under "
                              "runs/ (no '..', '.', empty parts, leading '/', backslash or control characters; '/' only "
                              "nests, as studies do); set run_dir to choose another path")
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
        for key, model in (("policy", self.policy), ("rewards.implicit.reward_reference", self.rewards.implicit.reward_reference),
                           ("rewards.reward_model.model", self.rewards.reward_model.model),
                           ("rewards.consistency.reference", self.rewards.consistency.reference)):
            if model is not None and not str(model.path).strip():
                raise ConfigError(f"{key}.path: empty; expected a model directory, a Hugging Face model name or "
                                  "builtin:tiny-multilingual")
        p = self.prompts
        if not p.path.strip():
            raise ConfigError("prompts.path: empty; expected a prompt file, a directory of <lang>.jsonl files, or "
                              "hf:<dataset name or local dataset directory>")
        if p.config is not None:
            try:
                fields = {f for _, f, _, _ in string.Formatter().parse(p.config) if f is not None}
            except ValueError:
                fields = {"?"}
            if fields - {"lang"}:
                raise ConfigError(f"prompts.config: {p.config!r}: expected a config name, or a template whose only "
                                  "field is {lang} (such as '{lang}' or 'arena_{lang}'; write {{ and }} for braces)")
        hub_only = [key for key, value in (("revision", p.revision), ("config", p.config)) if value is not None]
        hub_only += ["split"] if p.split != "train" else []  # a local source has no splits
        if hub_only and not p.path.startswith("hf:"):
            raise ConfigError(f"prompts.{hub_only[0]}: applies to hf: sources; prompts.path {p.path!r} is a local "
                              f"file or directory (remove prompts.{hub_only[0]}, or use hf:<dataset>)")
        self._validate_mode()
        self._validate_rewards()
        self._validate_training()
        self._validate_online()
        self._validate_sampling()
        e = self.engines
        if e.num_gpus > max(1, e.tensor_parallel):
            spread = ("set engines.tensor_parallel_size to spread the model over them" if e.backend == "vllm" else
                      "the hf engine runs on one GPU; engines.backend: vllm with tensor_parallel_size spreads a model")
            raise ConfigError(f"engines.num_gpus: an engine uses one GPU per tensor-parallel rank (tensor_parallel_"
                              f"size {e.tensor_parallel}), got {e.num_gpus:g}: the others would sit idle; {spread}")
        if e.backend == "vllm" and 0 < e.num_gpus < e.tensor_parallel_size:
            raise ConfigError(f"engines.num_gpus: the vllm backend needs at least tensor_parallel_size "
                              f"({e.tensor_parallel_size}) GPUs per engine, got {e.num_gpus}")
        if e.backend == "vllm" and e.num_gpus == 0 and e.tensor_parallel_size > 1:
            raise ConfigError(f"engines.tensor_parallel_size: {e.tensor_parallel_size} needs GPUs (engines.num_gpus); "
                              "vLLM on CPU (num_gpus: 0) runs one engine per actor")
        vllm_only = [k for k, is_set in (("max_model_len", e.max_model_len is not None),
                                         ("kv_cache_gib", e.kv_cache_gib is not None),
                                         ("tensor_parallel_size", e.tensor_parallel_size > 1)) if is_set]
        if e.backend == "hf" and vllm_only:
            raise ConfigError(f"engines.{vllm_only[0]}: only the vllm backend uses it, and engines.backend is hf; "
                              "remove it, or set engines.backend: vllm")
        if e.backend == "vllm" and e.max_model_len is not None and e.max_batch_tokens < e.max_model_len:
            raise ConfigError(f"engines.max_batch_tokens: {e.max_batch_tokens} is below engines.max_model_len "
                              f"{e.max_model_len}; a prompt must fit in one engine step")


    def _changed(self, keys: tuple[str, ...]) -> list[str]:
        """The keys (or the fields of sections) among `keys` set away from their defaults."""
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

    def _validate_mode(self) -> None:
        """Refuse a recipe whose settings belong to the other mode: they would be silently ignored."""
        if self.mode == "offline" and (keys := self._changed(("online",))):
            raise ConfigError(f"{', '.join(keys)}: online settings in an offline recipe; set mode: online to run the "
                              "online loop, or remove them")
        if self.mode == "online" and (keys := self._changed(OFFLINE_ONLY)):
            raise ConfigError(f"{', '.join(keys)}: offline settings in an online recipe (mode: online); remove them, "
                              "or set mode: offline")

    def _validate_online(self) -> None:
        o, r = self.online, self.rewards
        if self.mode == "online" and r.implicit.enabled and r.implicit.prompt == "translation":
            raise ConfigError("rewards.implicit.prompt: translation (R_t) translates every response with the policy "
                              "before scoring, which offline runs do; online RL takes cross_lingual or native")
        if o.score_weight:
            if not reward_enabled(self, o.score_reward):
                raise ConfigError(f"online.score_reward: {o.score_reward} needs {REWARD_KEY[o.score_reward]}")
            if self.mode == "online" and r.latent.enabled and r.latent.hub_layer == "auto":
                raise ConfigError("rewards.latent.hub_layer: auto is not resolved by online runs; run `rayalign "
                                  "hub-scan RECIPE` and set the layer it prints")
        if o.user_weight and not r.user.path:
            raise ConfigError("online.user_weight: needs rewards.user.path (the reward file)")
        if self.mode != "online":
            return
        if o.algorithm != "ppo" and (keys := self._changed(PPO_ONLY)):
            raise ConfigError(f"{', '.join(keys)}: PPO settings (the critic and GAE), unused by online.algorithm "
                              f"{o.algorithm}; remove them, or use online.algorithm: ppo")
        if o.checkpoint_every > o.steps:
            raise ConfigError(f"online.checkpoint_every: {o.checkpoint_every} is more than online.steps {o.steps}, so "
                              f"no checkpoint would be saved; use at most {o.steps}, or 0 for none")
        if not (o.fidelity_weight or o.user_weight or o.score_weight or o.length_weight):
            raise ConfigError("online.fidelity_weight: 0, and so are online.user_weight, score_weight and "
                              "length_weight: every rollout gets the same reward and nothing is learned; set one")
        if o.target_language is not None and o.target_language not in self.languages:
            raise ConfigError(f"online.target_language: {o.target_language!r} is not one of languages {self.languages}")

    def _validate_sampling(self) -> None:
        """Sampling that cannot give the rows the recipe compares, or that an engine would change silently."""
        s, e, method = self.sampling, self.engines, self.pairs.method
        if self.mode == "online":
            compares = self.online.algorithm in ("grpo", "rloo") and \
                f"online.algorithm {self.online.algorithm} compares the samples of a prompt (group advantages)"
            other = "; or use online.algorithm: ppo"
        else:
            compares = method in BEST_WORST_METHODS and \
                f"pairs.method {method} pairs the best and worst samples of a prompt"
            other = "; or use pairs.method lidr or dco"
        if compares and s.n < 2:
            raise ConfigError(f"sampling.n: {compares}, so n must be >= 2, got {s.n}{other}")
        if compares and s.temperature == 0:
            raise ConfigError(f"sampling.temperature: 0 (greedy) gives the {s.n} samples of a prompt one response, and "
                              f"{compares}: nothing would differ; set a temperature > 0 (the papers use 0.9 - 1.0)")
        if e.backend == "vllm" and 0 < s.temperature < 0.01:
            raise ConfigError(f"sampling.temperature: {s.temperature} would be raised to 0.01 by vLLM (the hf engine "
                              "keeps it); use 0 for greedy, or at least 0.01")
        if e.backend == "vllm" and e.max_model_len is not None and s.max_new_tokens >= e.max_model_len:
            raise ConfigError(f"sampling.max_new_tokens: {s.max_new_tokens} leaves no room for a prompt in "
                              f"engines.max_model_len {e.max_model_len}; lower it or raise max_model_len")

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
        if t.backend == "openrlhf" and t.batch_alignment:
            raise ConfigError("training.batch_alignment: OpenRLHF's trainer shuffles rows itself, so batches of whole "
                              "prompt groups need training.backend: deepspeed")
        if t.backend == "openrlhf" and not t.num_gpus:
            raise ConfigError("training.backend: openrlhf trains on GPUs (OpenRLHF needs CUDA and flash-attn): set "
                              "training.num_gpus: 1, or train with training.backend: deepspeed")

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
            empty = next((lang for lang, file in texts.items() if not isinstance(file, str) or not file.strip()), None)
            if empty is not None:
                raise ConfigError(f"rewards.latent.centroid_texts.{empty}: expected a text file path, got "
                                  f"{texts[empty]!r}")
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

            # the guarantee covers the pairs trained: all of them (DCO Lemma 3, a rank-1 Gamma), or the anchor with
            # each other language (Lemma 1 per pair; gamma_between is then unused)
            others = [lang for lang in self.languages if lang != self.anchor_language]
            trained = self.languages if c.language_pairs == "all" else [self.anchor_language, *others[:1]]
            gammas = dco_gamma_table(trained, self.anchor_language, c.gamma_from_anchor, c.gamma_to_anchor,
                                     c.gamma_between)
            try:
                check_gamma_rank_one(gamma_matrix(trained, gammas, c.beta))
            except ValueError as e:
                raise ConfigError(f"rewards.consistency: gammas break the consistency guarantee (need "
                                  f"gamma_ij * gamma_ji = beta^2 for every trained pair, and a rank-1 Gamma with "
                                  f"language_pairs: all; set force: true to accept): {e}")


# ---- reading and writing recipes (the dataclass builder and the override parser are in config/fields.py) ----


def _source(error: ConfigError, path: Path | None, overrides: typing.Sequence[str]) -> str:
    """The prefix naming where the setting an error names came from: the last `-o` override that set its key (or a
    section holding it), else one that set a key the message names further on (a check across keys, such as the
    anchor against languages), else the recipe file."""
    head, _, rest = str(error).partition(": ")
    keys = head.split(", ")
    for override in reversed(overrides):
        key = override.split("=", 1)[0].strip()
        if any(k == key or k.startswith((f"{key}.", f"{key}[")) for k in keys):
            return f"-o {override!r}: "
    for override in reversed(overrides):
        key = override.split("=", 1)[0].strip()
        if re.search(rf"(?<![\w.]){re.escape(key)}(?![\w])", rest):
            return f"-o {override!r} (with {path or 'the defaults'}): "
    return f"{path}: " if path is not None else ""


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> RunConfig:
    """Read a YAML recipe (safe loader), apply `key.sub=value` overrides, validate, and return it.

    Relative `prompts.path` values are resolved against the recipe's directory when that file exists.
    """
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        data = read_yaml_file(path, "recipe") or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of settings at the top level, got {type(data).__name__}")
        if not data:
            raise ConfigError(f"{path}: the recipe is empty; write at least the settings that differ from the "
                              "defaults (see `rayalign config`), for example `name: my-run`")
        if {"recipe", "grid"} <= set(data):
            raise ConfigError(f"{path}: a study file (recipe and grid), not a recipe: run it with `rayalign study "
                              f"{path}` (add --dry-run --cluster NAME to see its runs and their plans)")
        if "reference" in data:  # the config.yaml of a run made before the key's removal holds `reference: null`
            if data["reference"] is not None:
                raise ConfigError(f"{path}: reference: unknown key in the recipe: the top-level reference model was "
                                  "removed (no stage loaded it); each reference model has its own key: "
                                  "rewards.implicit.reward_reference (ICR), rewards.consistency.reference (DCO)")
            del data["reference"]
        pairs = data.get("pairs")
        if isinstance(pairs, dict) and {"method", "kto_reward", "min_margin", "include_anchor"} <= set(pairs) \
                and "truncated" not in pairs:  # a run's config.yaml from before the key: its pairs kept every response
            pairs["truncated"] = "keep"
    for override in overrides:
        set_override(data, override, RunConfig)
    try:
        cfg = build_dataclass(RunConfig, data)
        cfg.validate()
    except ConfigError as e:
        raise ConfigError(f"{_source(e, path, overrides)}{e}") from None
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
            if value and not Path(value).is_absolute() and (path.parent / value).exists():
                texts[lang] = str(path.parent / value)
    return cfg


def _strings(value, key: str = ""):
    """(recipe key, text) of every string in a config dict, nested ones and list items included."""
    if isinstance(value, str):
        yield key, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(v, f"{key}.{k}" if key else str(k))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _strings(v, f"{key}[{i}]")


def _local_path(value):
    """A path that exists here as the absolute path it names (an hf: prefix kept); anything else as it is."""
    if not isinstance(value, str) or not value:
        return value
    prefix = "hf:" if value.startswith("hf:") else ""
    local = Path(value[len(prefix):]).expanduser()
    return prefix + os.path.abspath(local) if local.exists() else value


def absolute_paths(d: dict) -> None:
    """Every local path of a config's dict (keys path and candidates_path, centroid_texts' files), made absolute;
    sections that are off (enabled: false) keep theirs as written, since they are not read."""
    for key, value in d.items():
        if isinstance(value, dict) and value.get("enabled") is False:
            continue
        if isinstance(value, dict):
            if key == "centroid_texts":
                d[key] = {lang: _local_path(v) for lang, v in value.items()}
            else:
                absolute_paths(value)
        elif key in ("path", "candidates_path"):
            d[key] = _local_path(value)


def resolved_dict(cfg: RunConfig) -> dict:
    """The config as a dict with its local paths absolute, so that it reads the same files from any directory."""
    d = cfg.to_dict()
    absolute_paths(d)
    return d


def save_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(resolved_dict(cfg), sort_keys=False, allow_unicode=True), encoding="utf-8")


