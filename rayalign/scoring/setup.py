"""What a recipe's scoring pass needs: the model roles, the forward specs, the pooled layers, and the extra
prompt column; and the rewards computed from the forward results."""

from __future__ import annotations

from rayalign.config import ConfigError, RunConfig
from rayalign.models import resolve_model_path
from rayalign.progress import model_build_progress


def num_hidden_layers(cfg: RunConfig, policy_path: str) -> int:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(policy_path, trust_remote_code=cfg.policy.trust_remote_code)
    return (config.get_text_config() if hasattr(config, "get_text_config") else config).num_hidden_layers


def latent_layers(cfg: RunConfig, policy_path: str, hub_layer: int | None = None) -> dict[str, int]:
    """Pooled layers of the latent rewards; `hub_layer` is the hub scan's choice when the recipe says auto."""
    from rayalign.rewards.latent import default_hub_layer

    num_layers = num_hidden_layers(cfg, policy_path)
    lat = cfg.rewards.latent
    if hub_layer is None:
        if lat.hub_layer == "auto":
            raise ConfigError("rewards.latent.hub_layer: auto is resolved by a hub scan (`rayalign launch` runs one on "
                              "iteration 1's samples; or run `rayalign hub-scan` and set the layer)")
        hub_layer = default_hub_layer(num_layers) if lat.hub_layer is None else lat.hub_layer
    layers = {"h_hub": hub_layer, "h_last": num_layers if lat.language_layer is None else lat.language_layer}
    for column, layer in layers.items():
        if layer > num_layers:
            key = "hub_layer" if column == "h_hub" else "language_layer"
            raise ConfigError(f"rewards.latent.{key}: {layer} is beyond the model's {num_layers} layers")
    return layers


def scoring_setup(cfg: RunConfig, policy_path: str, hub_layer: int | None = None):
    """What the scoring pass needs for the recipe's rewards: (model roles, forward specs, the reward-model role or
    None, pooled layers). Samples get their extra prompt column from `with_scoring_prompts`."""
    from rayalign.actors.scorer import ModelRole
    from rayalign.scoring.forward import ForwardSpec

    r = cfg.rewards
    roles = {"policy": ModelRole(policy_path, cfg.policy)}
    layers = latent_layers(cfg, policy_path, hub_layer) if r.latent.enabled else {}
    specs = [ForwardSpec("policy", "messages", "logp_policy", tuple(layers.items()), tokens_column="score_tokens")]
    if r.implicit.enabled:
        ref = r.implicit.reward_reference
        roles["reward_reference"] = ModelRole(resolve_model_path(ref.path, progress=model_build_progress(ref.path)), ref)
        prompt, response = "messages", "response"
        if r.implicit.prompt == "cross_lingual":
            prompt = "messages_cross_lingual"
        elif r.implicit.prompt == "translation":  # R_t: the policy's translation under x^en (`with_translations`)
            prompt, response = "messages_anchor", "response_anchor"
        if prompt != "messages":
            specs.append(ForwardSpec("policy", prompt, "logp_policy_icr", response_column=response))
        specs.append(ForwardSpec("reward_reference", prompt, "logp_reward_ref", response_column=response))
    reward_model = None
    if r.reward_model.enabled:
        reward_model = "reward_model"
        rm_path = r.reward_model.model.path
        roles[reward_model] = ModelRole(resolve_model_path(rm_path, model_build_progress(rm_path)), r.reward_model.model,
                                        kind="reward_model")
    return roles, specs, reward_model, layers


def forward_rewards(cfg: RunConfig, table, centroids: dict | None = None):
    """Rewards from the scoring pass's forward results: (scores table, reward parameters). R_m scores under the
    native prompt, whose log-probs are the policy's own. `centroids`: phi's language centroids from
    rewards.latent.centroid_texts (`centroids_from_texts`), else the run's own."""
    from rayalign.scoring.rewards import compute_rewards

    if cfg.rewards.implicit.enabled and cfg.rewards.implicit.prompt == "native":
        table = table.append_column("logp_policy_icr", table.column("logp_policy"))
    return compute_rewards(table, cfg, centroids)


def with_scoring_prompts(cfg: RunConfig, samples):
    """Samples with the cross-lingual prompt G(x) that ICR's R_c scores under, when the recipe asks for it."""
    import pyarrow as pa

    from rayalign.scoring.rewards import cross_lingual_messages

    if not (cfg.rewards.implicit.enabled and cfg.rewards.implicit.prompt == "cross_lingual"):
        return samples
    return samples.append_column("messages_cross_lingual",
                                 pa.array(cross_lingual_messages(samples, cfg.anchor_language)))
