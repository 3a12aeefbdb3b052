"""LaCoMSA language centroids from the user's own monolingual text (`rewards.latent.centroid_texts`).

The paper's phi compares a response with the centroid of its language at the language layer (docs/methods.md 1).
Centroids taken over the run's responses inherit their off-target answers: when many "German" responses are in
English, the German centroid moves toward English and phi stops telling them apart. Centroids from text known to
be in each language do not. Each line of a language's file is pooled like a response (an assistant turn after an
empty user turn, the end-of-turn token included) under the policy that scores the samples.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from rayalign.config import ConfigError
from rayalign.data.prompts import INVISIBLE

CENTROID_PROMPT = [{"role": "user", "content": ""}]  # no language cue besides the text itself


def visible(text: str) -> bool:
    return bool(text.translate(INVISIBLE).replace("\0", "").strip())


def centroid_text_rows(texts: dict[str, str]) -> pa.Table:
    """One row per non-empty line of each language's file: prompt_id, lang, sample_idx, messages, response."""
    rows = []
    for lang, path in texts.items():
        key = f"rewards.latent.centroid_texts.{lang}"
        try:
            lines = Path(path).read_text(encoding="utf-8-sig").splitlines()  # a BOM is not part of the first line
        except FileNotFoundError:
            where = "" if Path(path).is_absolute() else (" (a relative path is taken from the recipe's directory, "
                                                         f"else from the current one, {Path.cwd()})")
            raise ConfigError(f"{key}: {path} not found{where}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{key}: {path} is not valid UTF-8 ({e.reason} at byte {e.start})") from None
        except OSError as e:
            raise ConfigError(f"{key}: cannot read {path} ({e.strerror})") from None
        blank = next((i for i, line in enumerate(lines, 1) if line.strip() and not visible(line)), None)
        if blank is not None:
            raise ConfigError(f"{key}: {path}:{blank}: a line of only invisible characters (zero-width spaces, "
                              "NUL); remove it or give it text")
        passages = [line.strip() for line in lines if line.strip()]
        if not passages:
            raise ConfigError(f"{key}: {path} has no text (one passage per line)")
        rows += [{"prompt_id": f"centroid-text-{lang}-{i}", "lang": lang, "sample_idx": i,
                  "messages": CENTROID_PROMPT, "response": text} for i, text in enumerate(passages)]
    return pa.Table.from_pylist(rows)


def centroid_spec(language_layer: int):
    """The forward pass that pools the text lines at the language layer (column h_last)."""
    from rayalign.scoring.forward import ForwardSpec

    return ForwardSpec("policy", "messages", "logp_centroid_text", (("h_last", language_layer),))


def centroids_from_table(table: pa.Table) -> dict[str, np.ndarray]:
    """{lang: (H,)} the mean pooled state of each language's scored text lines."""
    from rayalign.rewards.latent import language_centroids
    from rayalign.scoring.forward import latent_matrix

    return language_centroids(latent_matrix(table.column("h_last")), table.column("lang").to_pylist())


def centroids_from_texts(cfg, group, language_layer: int) -> dict[str, np.ndarray] | None:
    """Centroids of rewards.latent.centroid_texts scored on `group` (a running ScoringGroup holding the policy);
    None when the recipe has none."""
    from rayalign.actors.pool import split_shards

    texts = cfg.rewards.latent.centroid_texts
    if not texts:
        return None
    shards = split_shards(centroid_text_rows(texts), 256)
    return centroids_from_table(group.gather(shards, [centroid_spec(language_layer)], None))
