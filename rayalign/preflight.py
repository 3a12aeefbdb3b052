"""Checks a recipe's inputs before Ray starts: its prompt set (local or on the Hub), DCO candidate sets, centroid
text files and every model it loads; and, before an offline run's work, what needs the model, user code or the
trainer backend (`preflight`)."""

from __future__ import annotations

from pathlib import Path

from rayalign.data.hub import (HF_PREFIX, HubError, check_hub_dataset, check_model_source, go_offline_if_unreachable,
                               hub_reachable, split_hf_path)
from rayalign.data.prompts import PromptError, load_candidate_sets, load_prompts


def check_sources(cfg, *, models: bool = True) -> None:
    """Refuse, before Ray starts, a prompt set or (with `models`) a model that cannot be read from here, or whose
    code the recipe does not trust.

    hf: prompt sets are loaded when the Hub cannot be reached (from the cache, or a clear error), and looked
    up on the Hub otherwise; local prompt sets and DCO candidate sets are read whole (ids missing a language,
    the anchor included, are refused), and so are the text files of rewards.latent.centroid_texts. Goes
    offline (HF_HUB_OFFLINE=1) when the Hub cannot be reached, so the clients never retry with backoff."""
    go_offline_if_unreachable()
    path = cfg.prompts.path
    if cfg.pairs.method != "dco" and path:
        if path.startswith(HF_PREFIX):
            try:
                _, local = split_hf_path(path)
                if local or not hub_reachable():
                    load_prompts(path, cfg.languages, **{**cfg.prompts.load_kwargs(), "limit": 1})
                else:
                    check_hub_dataset(path, revision=cfg.prompts.revision)
            except HubError as e:
                raise PromptError(str(e)) from None
        elif not Path(path).exists():
            raise PromptError(f"prompts.path: {path}: prompt source not found (a file, a directory of <lang> files, "
                              "or hf:<dataset name or directory>)")
        else:  # read whole: every prompt id in every language, the anchor included, before anything starts
            load_prompts(path, cfg.languages, **cfg.prompts.load_kwargs())
    elif cfg.pairs.method == "dco":
        candidates = cfg.rewards.consistency.candidates_path
        if not candidates or not Path(candidates).is_dir():
            raise PromptError(f"rewards.consistency.candidates_path: {candidates}: candidate set directory not found "
                              "(a directory with one <lang>.jsonl per language; a relative path is taken from the "
                              "recipe's directory, else from the current one)")
        load_candidate_sets(candidates, cfg.languages)
    if cfg.rewards.user.path:  # read, not run: the file's code runs where the rewards are computed
        from rayalign.scoring.rewards import check_user_reward

        check_user_reward(cfg.rewards.user.path, cfg.rewards.user.function)
    if cfg.rewards.latent.enabled and cfg.rewards.latent.centroid_texts:
        from rayalign.scoring.centroid_texts import centroid_text_rows

        centroid_text_rows(cfg.rewards.latent.centroid_texts)  # each file found, UTF-8 and not empty
    if models:  # torch and transformers are imported only here
        for section, model in cfg.models():
            check_local_model(section, model)


def check_local_model(section: str, model) -> None:
    """A model as every actor will load it: a builtin name, or a local directory with its config, whole weights and
    a tokenizer that loads with a chat template; Hub ids only by their presence (cache or Hub)."""
    from rayalign.config import TINY_MODEL
    from rayalign.models import ModelLoadError, check_model_code, is_tiny_model, load_tokenizer, resolve_model_path

    path = model.path
    check_model_source(f"{section}.path", path)
    if path.startswith("builtin:") and not is_tiny_model(path):
        raise ModelLoadError(f"{section}.path: {path}: no such builtin model (there is {TINY_MODEL})")
    check_model_code(section, model)  # needs trust_remote_code: refused here, not in every actor
    if is_tiny_model(path) or not (Path(path).expanduser().exists() or path.startswith((".", "/", "~"))):
        return
    try:
        load_tokenizer(resolve_model_path(path), model.trust_remote_code)  # config, whole weights, tokenizer
    except ModelLoadError as e:
        raise ModelLoadError(f"{section}.path: {e}") from None
    except Exception as e:  # a tokenizer file transformers cannot parse
        raise ModelLoadError(f"{section}.path: {path}: the tokenizer cannot be loaded ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:200]})") from None


def preflight(cfg, policy_path: str, run_dir: Path) -> None:
    """Checks of an offline run that need the model, user code or the trainer backend, made before any work: the
    trackers' packages, the engine settings against the model, the latent layers against the model's, the user
    reward file's function (importing the file runs it, as scoring would), and OpenRLHF's launcher and flags."""
    from rayalign.engines import check_engine_settings
    from rayalign.run_dir import recipe_stages
    from rayalign.scoring.rewards import load_user_reward
    from rayalign.scoring.setup import latent_layers
    from rayalign.tracking import check_trackers

    check_trackers(cfg)
    stages = recipe_stages(cfg)
    if "generate" in stages:
        check_engine_settings(cfg, policy_path)
    r = cfg.rewards
    if r.latent.enabled and r.latent.hub_layer != "auto":
        latent_layers(cfg, policy_path)
    if r.user.path:
        load_user_reward(r.user.path, r.user.function)
    if "train" in stages and cfg.training.backend == "openrlhf":
        from rayalign.integrations.openrlhf import check_backend

        check_backend(cfg, Path(run_dir))


def check_training_rows(cfg, prompt_ids: int) -> None:
    """Refuse, before any work, a recipe whose pairs stage cannot make one global batch of rows from `prompt_ids`
    prompts: at most one pair per (prompt, language) for best-vs-worst methods (two rows for KTO), one per
    (prompt, non-anchor language) for LIDR."""
    from rayalign.config import ConfigError

    p, t = cfg.pairs, cfg.training
    languages = len(cfg.languages) - (0 if p.include_anchor else 1)
    most = {"kto": 2 * prompt_ids * languages, "lidr": prompt_ids * (len(cfg.languages) - 1),
            "dco": None}.get(p.method, prompt_ids * languages)
    batch = t.micro_batch_size * t.gradient_accumulation * t.world_size if isinstance(t.world_size, int) else None
    if t.loss and most is not None and batch and most < batch:
        raise ConfigError(f"training: the pairs stage makes at most {most} rows from {prompt_ids} prompt(s) in "
                          f"{len(cfg.languages)} languages (pairs.method {p.method}), fewer than one global batch of "
                          f"{batch} (training.micro_batch_size x gradient_accumulation x world_size); raise "
                          "prompts.limit, or lower the batch")
