"""Training data and the loss of one micro-batch for the DPO family, without Ray or DeepSpeed.

Preference data (pairs, kto or dco datasets) is encoded once with the chat template, exactly as the scoring
pass saw it (`encode_response`), so the reference log-probs stored in the dataset match the sequences
trained on and no reference model is held. `batch_plan` fixes the order of rows, the same on every rank:
global batch b of an epoch is cut into micro-batches, and rank r takes micro-batch m * W + r at
accumulation step m.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch

from rayalign.losses import preference as losses
from rayalign.methods import SEQUENCES
from rayalign.models import encode_response

REFERENCE_FREE = ("simpo", "orpo")
METRICS = ("loss", "reward_chosen", "reward_rejected", "reward_margin", "accuracy", "nll", "kl", "log_odds_ratio",
           "loss_at_reference")


class TrainingDataError(ValueError):
    """Preference data that cannot be trained on; the message names the dataset, row and column."""


@dataclass
class TrainingData:
    schema: str
    sequences: list[list[tuple[list[int], list[int]]]]  # per row: (prompt_ids, response_ids) per sequence
    values: dict[str, np.ndarray]  # per-row numbers the loss needs: reference log-probs, labels, gammas
    prompt_ids: list[str]
    langs: list[str]
    dropped_too_long: int = 0
    source: str = ""
    lengths: np.ndarray = field(init=False)  # longest sequence of each row, in tokens

    def __post_init__(self):
        self.lengths = np.array([max(len(p) + len(r) for p, r in row) for row in self.sequences], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.sequences)


def _response_text(messages, where: str) -> str:
    if not messages or len(messages) != 1 or messages[0]["role"] != "assistant":
        raise TrainingDataError(f"{where}: expected one assistant message, got {messages!r}")
    return messages[0]["content"]


def encode_dataset(table: pa.Table, schema: str, tokenizer, *, max_length: int, needs_reference: bool = True,
                   source: str = "") -> TrainingData:
    """Tokenize every row's sequences; rows with a sequence over `max_length` tokens are left out and counted."""
    layout = SEQUENCES[schema]
    columns = table.to_pydict()
    required = [c for p, r, ref, _ in layout for c in (p, r, ref if needs_reference else None) if c]
    missing = [c for c in required + ["prompt_id", "lang_2" if schema == "dco" else "lang"] if c not in columns]
    if missing:
        raise TrainingDataError(f"{source}: not a {schema} dataset, missing column {missing[0]!r}")
    prompt_cache: dict[str, list[int]] = {}
    sequences, keep, dropped = [], [], 0
    for i in range(table.num_rows):
        row = []
        for prompt_col, response_col, ref_col, tokens_col in layout:
            where = f"{source} row {i} column {response_col}"
            messages = columns[prompt_col][i]
            key = repr(messages)
            prompt, response = encode_response(tokenizer, messages, _response_text(columns[response_col][i], where))
            prompt = prompt_cache.setdefault(key, prompt)
            scored = columns[tokens_col][i] if tokens_col in columns else None
            if scored is not None and scored != len(response):
                raise TrainingDataError(f"{where}: the response encodes to {len(response)} tokens, but it was scored "
                                        f"with {scored} ({tokens_col}); the reference log-probs belong to another "
                                        "tokenizer or chat template")
            if needs_reference and columns[ref_col][i] is None:
                raise TrainingDataError(f"{source} row {i} column {ref_col}: the reference log-prob is missing "
                                        "(null); rescore the data or use a reference-free loss (simpo, orpo)")
            row.append((prompt, response))
        if max(len(p) + len(r) for p, r in row) > max_length:
            dropped += 1
            continue
        sequences.append(row)
        keep.append(i)
    if not sequences:
        raise TrainingDataError(f"{source}: no row fits training.max_length {max_length} "
                                f"({dropped} of {table.num_rows} are longer)" if dropped else f"{source}: no rows")
    values = {}
    for _, _, ref_col, _ in layout:
        refs = columns.get(ref_col, [None] * table.num_rows)
        values[ref_col] = np.array([np.nan if refs[i] is None else refs[i] for i in keep], dtype=np.float64)
    if schema == "kto":
        values["label"] = np.array([columns["label"][i] for i in keep], dtype=np.float64)
    if schema == "dco":
        for g in ("gamma_12", "gamma_21"):
            values[g] = np.array([columns[g][i] for i in keep], dtype=np.float64)
    lang_col = "lang_2" if schema == "dco" else "lang"
    return TrainingData(schema, sequences, values, [columns["prompt_id"][i] for i in keep],
                        [columns[lang_col][i] for i in keep], dropped, source)


def batch_alignment_languages(languages: list[str], anchor: str, enabled: bool) -> list[str] | None:
    """The languages of every batch-alignment group (the batch alignment paper): the anchor first, then the others;
    None when batch alignment is off."""
    if not enabled:
        return None
    if anchor not in languages:
        raise ValueError(f"batch alignment: the anchor language {anchor!r} is not among the run's {languages}")
    return [anchor] + [lang for lang in languages if lang != anchor]


def batch_plan(data: TrainingData, global_batch: int, *, seed: int, epoch: int, length_grouping: bool = True,
               aligned_languages: list[str] | None = None) -> list[list[int]]:
    """Row indices of every full global batch of an epoch (an incomplete last batch is left out).

    length_grouping: rows are shuffled, sorted by length within windows of 16 batches, cut into batches, and
    the batches shuffled again; each batch is sorted by length so its micro-batches pad little.
    aligned_languages (batch alignment): every batch is made of whole prompt groups, each group the
    same prompt_id in every language, in the given order; prompt ids missing a language are left out.
    """
    rng = np.random.default_rng([seed, epoch])
    if aligned_languages:
        k = len(aligned_languages)
        if global_batch % k:
            raise TrainingDataError(f"batch alignment: global batch {global_batch} is not a multiple of {k} languages")
        groups: dict[str, dict[str, int]] = {}
        for i, (pid, lang) in enumerate(zip(data.prompt_ids, data.langs)):
            groups.setdefault(pid, {}).setdefault(lang, i)
        complete = [pid for pid in sorted(groups) if all(lang in groups[pid] for lang in aligned_languages)]
        per_batch = global_batch // k
        order = [complete[g] for g in rng.permutation(len(complete))]
        batches = [[groups[pid][lang] for pid in order[b * per_batch:(b + 1) * per_batch] for lang in aligned_languages]
                   for b in range(len(order) // per_batch)]
        available = f"{len(complete)} prompt groups complete in all {k} languages"
    else:
        order = rng.permutation(len(data))
        if length_grouping:
            window = global_batch * 16
            order = np.concatenate([sorted(order[s:s + window], key=lambda i: -data.lengths[i])
                                    for s in range(0, len(order), window)])
        batches = [order[b * global_batch:(b + 1) * global_batch].tolist() for b in range(len(order) // global_batch)]
        if length_grouping:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        available = f"{len(data)} rows"
    if not batches:
        raise TrainingDataError(f"{data.source}: {available}, fewer than one global batch of {global_batch}; "
                                "lower training.micro_batch_size, gradient_accumulation or world_size")
    if length_grouping:
        batches = [sorted(b, key=lambda i: -data.lengths[i]) for b in batches]
    return batches


def micro_batch(batch: list[int], rank: int, step: int, world_size: int, micro_batch_size: int) -> list[int]:
    start = (step * world_size + rank) * micro_batch_size
    return batch[start:start + micro_batch_size]


def collate(data: TrainingData, rows: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded tensors, sequence-major: sequence j of row i sits at j * len(rows) + i.

    loss_mask marks the response tokens (the positions whose log-probs are summed)."""
    seqs = [data.sequences[r][j] for j in range(len(data.sequences[rows[0]])) for r in rows]
    width = max(len(p) + len(r) for p, r in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(seqs), width), dtype=torch.long)
    loss_mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    for b, (p, r) in enumerate(seqs):
        ids[b, :len(p) + len(r)] = torch.tensor(p + r)
        attention[b, :len(p) + len(r)] = 1
        loss_mask[b, len(p):len(p) + len(r)] = True
    out = {"input_ids": ids, "attention_mask": attention, "loss_mask": loss_mask}
    for name, column in data.values.items():
        out[name] = torch.as_tensor(column[rows], dtype=torch.float32)
    return out


def token_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Log-prob of each masked token given the tokens before it, float32, (B, T); 0 elsewhere."""
    from rayalign.engines.hf import token_logprobs

    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    predicting = loss_mask[:, 1:]  # logits at t predict token t + 1
    out = torch.zeros(input_ids.shape, dtype=torch.float32, device=input_ids.device)
    out[:, 1:][predicting] = token_logprobs(logits[:, :-1][predicting], input_ids[:, 1:][predicting])
    return out


def sequence_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probs of the masked tokens, their counts) per sequence, float32, differentiable."""
    return token_logps(model, input_ids, attention_mask, loss_mask).sum(1), loss_mask.sum(1).float()


def kto_mismatched_data(data: TrainingData) -> TrainingData:
    """Row i of a kto dataset as KTO's mismatched pair (x_i, y_j), j = `losses.kto_mismatched_rows` (another
    prompt's response), for the reference point z_ref."""
    pairs = losses.kto_mismatched_rows(data.prompt_ids)
    sequences = [[(data.sequences[i][0][0], data.sequences[j][0][1])] for i, j in enumerate(pairs)]
    return TrainingData("kto", sequences, {}, data.prompt_ids, data.langs, 0, data.source)


def compute_loss(loss: str, logps: torch.Tensor, counts: torch.Tensor, batch: dict, t, dco_beta: float = 1.0,
                 kto_kl: torch.Tensor | None = None):
    """The configured loss (TrainingConfig `t`) on one micro-batch's sequence log-probs -> (loss, metrics).

    kto_kl: KTO's reference point over the global batch (`losses.kto_reference_point`); None = the matched rows."""
    v = {k: x.to(logps.device) for k, x in batch.items() if k not in ("input_ids", "attention_mask", "loss_mask")}
    if loss == "kto":
        out = losses.kto_loss(logps, v["ref_logp"], v["label"].bool(), beta=t.beta,
                              desirable_weight=t.kto_desirable_weight, undesirable_weight=t.kto_undesirable_weight,
                              kl=kto_kl)
    elif loss == "dco":
        out = losses.dco_loss(*logps.split(len(logps) // 4), v["ref_logp_chosen_1"], v["ref_logp_rejected_1"], v["ref_logp_chosen_2"],
                              v["ref_logp_rejected_2"], v["gamma_12"], v["gamma_21"], beta=dco_beta)
    else:
        n = len(logps) // 2
        (pc, pr), (nc, nr) = logps.split(n), counts.split(n)
        if loss in ("dpo", "cdpo"):
            out = losses.dpo_loss(pc, pr, v["ref_logp_chosen"], v["ref_logp_rejected"], beta=t.beta,
                                  label_smoothing=t.label_smoothing if loss == "cdpo" else 0.0,
                                  nll_weight=t.nll_weight, chosen_tokens=nc)
        elif loss == "ipo":
            out = losses.ipo_loss(pc, pr, v["ref_logp_chosen"], v["ref_logp_rejected"], beta=t.beta,
                                  nll_weight=t.nll_weight, chosen_tokens=nc)
        elif loss == "simpo":
            out = losses.simpo_loss(pc, pr, nc, nr, beta=t.beta, margin=t.simpo_margin, nll_weight=t.nll_weight)
        elif loss == "orpo":
            out = losses.orpo_loss(pc, pr, nc, nr, lam=t.orpo_lambda)
        else:
            raise ValueError(f"unknown loss {loss!r}")
    return out.loss, loss_metrics(out, paired=loss != "kto")


def loss_metrics(out, paired: bool = True) -> dict[str, tuple[float, int]]:
    """(sum, count) per metric, so that micro-batches and ranks can be averaged exactly. The margin and accuracy
    compare each chosen row with its rejected one: `paired` losses only (KTO's desirable and undesirable rows are
    separate rows)."""
    m = {"loss": (float(out.loss.detach()), 1)}
    c, r = out.chosen_rewards.detach().float(), out.rejected_rewards.detach().float()
    if len(c):
        m["reward_chosen"] = (float(c.sum()), len(c))
    if len(r):
        m["reward_rejected"] = (float(r.sum()), len(r))
    if paired and len(c) and len(c) == len(r):
        m["reward_margin"] = (float((c - r).sum()), len(c))
        m["accuracy"] = (float((c > r).float().sum()), len(c))
    for key, value in out.metrics.items():
        if key in METRICS:
            m[key] = (float(value), 1)
    return m
