"""Forward quantities -> reward columns of the scores dataset (used by `score` and `rescore`).

Latent rewards are computed from the float16 pooled states that the dataset stores, so
`rayalign rescore` with the same settings reproduces the stored rewards exactly.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import math
from pathlib import Path

import numpy as np
import pyarrow as pa

from rayalign.config import ConfigError, RunConfig
from rayalign.data.schemas import LATENT_COLUMNS, schema_for
from rayalign.languages import language_name
from rayalign.scoring.forward import latent_matrix

REWARD_COLUMNS = ("r_msa", "phi", "w", "r_lacomsa", "r_icr", "r_rm", "r_user")


class RewardError(ValueError):
    """A reward that cannot be used (NaN, wrong length, a failing user function); names the row."""


def cross_lingual_messages(table: pa.Table, anchor: str) -> list[list[dict]]:
    """G(x^l) for every row: the anchor-language instruction of the same prompt_id, with the language prefix
    for non-anchor rows (docs/methods.md section 2). System messages of the row are kept."""
    from rayalign.rewards.implicit import cross_lingual_prompt

    rows = table.select(["prompt_id", "lang", "messages"]).to_pylist()
    anchor_text = {r["prompt_id"]: _user_text(r["messages"]) for r in rows if r["lang"] == anchor}
    out = []
    for r in rows:
        if r["prompt_id"] not in anchor_text:
            raise RewardError(f"prompt_id {r['prompt_id']!r}: no {anchor} prompt to build the cross-lingual prompt")
        system = [m for m in r["messages"] if m["role"] == "system"]
        text = cross_lingual_prompt(anchor_text[r["prompt_id"]], r["lang"], language_name(r["lang"]), anchor)
        out.append(system + [{"role": "user", "content": text}])
    return out


def _user_text(messages: list[dict]) -> str:
    return "\n\n".join(m["content"] for m in messages if m["role"] == "user")


def check_user_reward(path: str, function: str) -> None:
    """The user's reward file read without running it: found, valid Python, and binding the name `function`
    (a def, an assignment or an import)."""
    import ast

    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"rewards.user.path: {file} not found")
    try:
        tree = ast.parse(file.read_bytes(), filename=str(file))
    except (SyntaxError, ValueError) as e:
        line = f":{e.lineno}" if getattr(e, "lineno", None) else ""
        raise ConfigError(f"rewards.user.path: {file}{line}: not valid Python ({getattr(e, 'msg', e)})") from None
    nodes = list(ast.walk(tree))  # definitions anywhere (also under an `if`): only a name never bound is refused
    names = {n.name for n in nodes if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    names |= {n.id for n in nodes if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    names |= {(a.asname or a.name).split(".")[0] for n in nodes if isinstance(n, (ast.Import, ast.ImportFrom))
              for a in n.names}
    if function not in names:
        raise ConfigError(f"rewards.user.function: {file} defines no function {function!r}")
    defined = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == function]
    if defined:  # called with one argument: the samples of one prompt_id
        args = defined[-1].args
        positional = len(args.posonlyargs) + len(args.args)
        if (positional < 1 and not args.vararg) or positional - len(args.defaults) > 1 or \
                len(args.kwonlyargs) > len(args.kw_defaults) - args.kw_defaults.count(None):
            raise ConfigError(f"rewards.user.function: {file}:{defined[-1].lineno}: {function}() must take one "
                              "argument, the samples of one prompt_id in every language (a list of row dicts)")


def load_user_reward(path: str, function: str):
    """Import `function` from the Python file at `path` (this runs the file's code)."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"rewards.user.path: {file} not found")
    name = f"rayalign_user_reward_{file.stem}"
    spec = importlib.util.spec_from_loader(name, importlib.machinery.SourceFileLoader(name, str(file)))
    module = importlib.util.module_from_spec(spec)  # any file name: check_user_reward parsed it as Python
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as e:
        raise RewardError(f"rewards.user.path: {file}: importing it raised {type(e).__name__}: {e}") from None
    fn = getattr(module, function, None)
    if not callable(fn):
        raise ConfigError(f"rewards.user.function: {file} defines no function {function!r}")
    return fn


def _scores(values, count: int, returned: str, where: str) -> np.ndarray:
    """A user function's return value as `count` float64 scores, or a RewardError saying what came back."""
    expected = f"expected a list of {count} numbers (one per sample)"
    if not isinstance(values, (list, tuple, np.ndarray)):
        raise RewardError(f"{returned} a {type(values).__name__} {where}; {expected}")
    try:
        scores = np.asarray(values, np.float64)
    except (TypeError, ValueError, OverflowError) as e:
        raise RewardError(f"{returned} a {type(values).__name__} {where} holding values that are not numbers ({e}); "
                          f"{expected}") from None
    if scores.shape != (count,):
        got = f"{scores.shape[0]} scores" if scores.ndim == 1 else f"a {type(values).__name__} of shape {scores.shape}"
        raise RewardError(f"{returned} {got} {where}, {expected}")
    return scores


def user_rewards(table: pa.Table, path: str, function: str) -> np.ndarray:
    """Call the user's function once per prompt_id with that prompt's samples in every language."""
    fn = load_user_reward(path, function)
    keep = [c for c in table.column_names if c not in LATENT_COLUMNS]
    rows = table.select(keep).to_pylist()
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(r["prompt_id"], []).append(i)
    out = np.empty(len(rows))
    for prompt_id, idx in groups.items():
        try:
            values = fn([rows[i] for i in idx])
        except (Exception, SystemExit) as e:
            raise RewardError(f"{path}:{function} failed on prompt_id {prompt_id!r}: {type(e).__name__}: {e}") from e
        values = _scores(values, len(idx), f"{path}:{function} returned", f"for prompt_id {prompt_id!r}")
        bad = np.flatnonzero(~np.isfinite(values))
        if bad.size:
            row = rows[idx[bad[0]]]  # online rollouts may lack sample_idx
            raise RewardError(f"{path}:{function} returned {values[bad[0]]} for prompt_id {prompt_id!r} "
                              f"({row.get('lang')}) sample {row.get('sample_idx')}; rewards must be finite")
        out[idx] = values
    return out


def compute_rewards(table: pa.Table, cfg: RunConfig, centroids: dict | None = None) -> tuple[pa.Table, dict]:
    """Fill the reward columns that the recipe enables; returns the table in the scores schema and the
    parameters used (layers, per-language alphas), which go into the dataset's manifest. `centroids` {lang: (H,)}
    replace the run's language centroids of phi (rewards.latent.centroid_texts)."""
    from rayalign.rewards.implicit import alpha_per_language, implicit_reward
    from rayalign.rewards.latent import latent_rewards

    prompt_ids = np.asarray(table.column("prompt_id").to_pylist())
    langs = np.asarray(table.column("lang").to_pylist())
    columns: dict[str, np.ndarray] = {}
    params: dict = {}
    lat = cfg.rewards.latent
    if lat.enabled:
        if "h_hub" not in table.column_names:
            raise RewardError("latent rewards need the pooled states h_hub and h_last (rescore a dataset scored with "
                              "rewards.latent.store_latents: true)")
        columns.update(latent_rewards(
            prompt_ids, langs, latent_matrix(table.column("h_hub")), latent_matrix(table.column("h_last")),
            anchor=cfg.anchor_language, alpha=lat.alpha, gamma=lat.gamma, centroid_mode=lat.centroid_mode,
            weight_form=lat.weight_form, centroids=centroids))
        params["latent"] = {"alpha": lat.alpha, "gamma": lat.gamma, "centroid_mode": lat.centroid_mode,
                            "weight_form": lat.weight_form, "anchor": cfg.anchor_language,
                            "centroids": "run" if centroids is None else "centroid_texts"}
        if centroids is not None and lat.centroid_texts:
            params["latent"]["centroid_texts"] = dict(lat.centroid_texts)  # the files, by language
    imp = cfg.rewards.implicit
    if imp.enabled:
        logp_policy, logp_ref = (np.asarray(table.column(c).to_pylist(), dtype=np.float64)
                                 for c in ("logp_policy_icr", "logp_reward_ref"))
        if imp.length_unit == "chars":
            lengths = np.asarray([len(r) for r in table.column("response").to_pylist()], dtype=np.float64)
        else:
            lengths = np.asarray(table.column("score_tokens").to_pylist(), dtype=np.float64)
        groups = np.char.add(np.char.add(prompt_ids.astype(str), "\x1f"), langs.astype(str))
        if imp.alpha is None:
            base = implicit_reward(logp_policy, logp_ref, lengths, alpha=0.0, beta=imp.beta)
            alphas = alpha_per_language(base, lengths, groups, langs, grid=np.arange(imp.alpha_grid) / imp.alpha_grid)
        else:
            alphas = {lang: imp.alpha for lang in np.unique(langs)}
        alphas = {str(k): float(v) for k, v in alphas.items()}
        columns["r_icr"] = implicit_reward(logp_policy, logp_ref, lengths, np.asarray([alphas[lang] for lang in langs]),
                                           beta=imp.beta)
        params["icr"] = {"alpha_per_language": alphas, "beta": imp.beta, "length_unit": imp.length_unit,
                         "prompt": imp.prompt}
    if cfg.rewards.user.path:
        columns["r_user"] = user_rewards(table, cfg.rewards.user.path, cfg.rewards.user.function)
        params["user"] = {"path": cfg.rewards.user.path, "function": cfg.rewards.user.function}
    for name, values in columns.items():
        table = _set_column(table, name, pa.array(values, pa.float64()))
    check_finite(table)
    return to_scores_schema(table), params


def _set_column(table: pa.Table, name: str, values) -> pa.Table:
    if name in table.column_names:
        return table.set_column(table.column_names.index(name), name, values)
    return table.append_column(name, values)


def to_scores_schema(table: pa.Table) -> pa.Table:
    """Order the columns as the scores schema and fill reward columns the recipe does not compute with nulls."""
    dim = table.schema.field("h_hub").type.list_size if "h_hub" in table.column_names else 0
    _, schema = schema_for("scores", {"latent_dim": dim})
    for field in schema:
        if field.name not in table.column_names:
            table = table.append_column(field.name, pa.nulls(table.num_rows, field.type))
    return table.select(schema.names).cast(schema)


def check_finite(table: pa.Table) -> None:
    """Refuse NaN or infinite rewards and log-probs, naming the column and the sample."""
    for name in ("logp_policy", "logp_policy_icr", "logp_reward_ref") + REWARD_COLUMNS:
        if name not in table.column_names:
            continue
        values = table.column(name).to_pylist()
        for i, v in enumerate(values):
            if v is not None and not math.isfinite(v):
                row = table.slice(i, 1).select(["prompt_id", "lang", "sample_idx"]).to_pylist()[0]
                raise RewardError(f"{name} is {v} for prompt_id {row['prompt_id']!r} ({row['lang']}) sample "
                                  f"{row['sample_idx']}; rewards must be finite")
