"""DPO step time and memory, in one run on the same model and batches.

rayalign trains with the reference log-probs that the scoring pass already wrote into the pairs, so no
reference model is held. The baseline does what OpenRLHF's DPO trainer does: keep a frozen copy of the
policy and run it forward (no grad) on every batch. Both compute the same loss on the same batches
(checked), with the same policy forward/backward and AdamW step; only the reference differs.

    python benchmarks/training.py [--hidden 512] [--layers 8] [--pairs 8] [--steps 6]
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

REPO = Path(__file__).resolve().parents[1]


def build_model(out: Path, hidden: int, layers: int) -> str:
    """A Llama of the given size with the tiny model's tokenizer, saved and loaded like a real checkpoint."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from rayalign.models import ensure_tiny_model, load_tokenizer

    tiny = str(ensure_tiny_model())
    cfg = AutoConfig.from_pretrained(tiny)
    cfg.update({"hidden_size": hidden, "intermediate_size": hidden * 8 // 3, "num_hidden_layers": layers,
                "num_attention_heads": hidden // 64, "num_key_value_heads": hidden // 64, "head_dim": 64})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    load_tokenizer(tiny).save_pretrained(out)
    return str(out)


def make_pairs(tokenizer, count: int) -> pa.Table:
    rows = []
    for lang in ("en", "de", "fr", "es", "ru"):
        for line in (REPO / "examples" / "data" / "prompts" / f"{lang}.jsonl").read_text().splitlines()[:count]:
            r = json.loads(line)
            rows.append({"prompt": [{"role": "user", "content": r["instruction"]}],
                         "chosen": [{"role": "assistant", "content": r["output"]}],
                         "rejected": [{"role": "assistant", "content": " ".join(r["output"].split()[::2])}],
                         "prompt_id": r["instruction_id"], "lang": lang,
                         "ref_logp_chosen": 0.0, "ref_logp_rejected": 0.0})
    return pa.Table.from_pylist(rows)


def reference_logps(model, data, batches, pad):
    """What the scoring pass stores: each sequence's summed log-prob under the (frozen) reference."""
    from rayalign.training.data import collate, sequence_logps

    for rows in batches:
        b = collate(data, rows, pad)
        with torch.no_grad():
            logps, _ = sequence_logps(model, b["input_ids"], b["attention_mask"], b["loss_mask"])
        n = len(rows)
        data.values["ref_logp_chosen"][rows] = logps[:n].double().numpy()
        data.values["ref_logp_rejected"][rows] = logps[n:].double().numpy()


def run(model_path: str, data, batches, pad, held_reference: bool) -> dict:
    from rayalign.config import TrainingConfig
    from rayalign.models import load_causal_lm
    from rayalign.training.data import collate, compute_loss, sequence_logps

    t = TrainingConfig(loss="dpo", beta=0.1)
    policy = load_causal_lm(model_path, "float32").train()
    reference = load_causal_lm(model_path, "float32").eval().requires_grad_(False) if held_reference else None
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-6)
    times, losses = [], []
    for rows in batches:
        b = collate(data, rows, pad)
        started = time.perf_counter()
        if reference is not None:  # the baseline recomputes the reference log-probs on every batch
            with torch.no_grad():
                ref, _ = sequence_logps(reference, b["input_ids"], b["attention_mask"], b["loss_mask"])
            n = len(rows)
            b["ref_logp_chosen"], b["ref_logp_rejected"] = ref[:n], ref[n:]
        logps, counts = sequence_logps(policy, b["input_ids"], b["attention_mask"], b["loss_mask"])
        loss, _ = compute_loss("dpo", logps, counts, b, t)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
        losses.append(float(loss.detach()))
    weights = sum(p.numel() * p.element_size() for p in policy.parameters())
    held = weights if reference is not None else 0
    return {"seconds": times, "losses": losses, "weights_bytes": weights, "reference_bytes": held,
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def run_in_child(*args) -> dict:
    """One variant in a fresh process, so that its peak memory is its own."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(run, args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--pairs", type=int, default=8, help="pairs per batch")
    parser.add_argument("--steps", type=int, default=6, help="timed steps (after one warm-up step)")
    args = parser.parse_args()
    torch.set_num_threads(2)

    from rayalign.models import load_causal_lm, load_tokenizer
    from rayalign.training.data import encode_dataset

    with tempfile.TemporaryDirectory() as tmp:
        model_path = build_model(Path(tmp) / "model", args.hidden, args.layers)
        tok = load_tokenizer(model_path)
        data = encode_dataset(make_pairs(tok, 20), "pairs", tok, max_length=1024)
        rng = np.random.default_rng(0)
        order = rng.permutation(len(data))
        batches = [order[i * args.pairs:(i + 1) * args.pairs].tolist() for i in range(args.steps + 1)]
        pad = tok.pad_token_id
        reference_logps(load_causal_lm(model_path, "float32").eval(), data, batches, pad)
        results = {}
        for name, held in (("held reference (OpenRLHF)", True), ("precomputed (rayalign)", False)):
            results[name] = run_in_child(model_path, data, batches, pad, held)
        base, ours = results["held reference (OpenRLHF)"], results["precomputed (rayalign)"]
        np.testing.assert_allclose(base["losses"], ours["losses"], atol=1e-4)  # the same training
        n_params = base["weights_bytes"] // 4
        tokens = int(np.mean([sum(len(p) + len(r) for p, r in data.sequences[i]) for b in batches for i in b]))
        t_base, t_ours = np.median(base["seconds"][1:]), np.median(ours["seconds"][1:])
        print(f"model: Llama {args.layers} layers x {args.hidden} hidden, {n_params / 1e6:.1f}M parameters, fp32, "
              f"{torch.get_num_threads()} CPU threads; batch {args.pairs} pairs (~{tokens * args.pairs} tokens)")
        print(f"DPO step, median of {args.steps} after warm-up:")
        print(f"  held reference (OpenRLHF): {t_base * 1e3:8.1f} ms")
        print(f"  precomputed (rayalign):    {t_ours * 1e3:8.1f} ms")
        print(f"  speed-up: {t_base / t_ours:.2f}x (goal 1.4x); losses equal within 1e-4")
        print(f"memory: the baseline holds a reference copy of {base['reference_bytes'] / 2**20:.1f} MiB (fp32); "
              f"rayalign holds none")
        print(f"  peak RSS per training process: held reference {base['peak_rss'] / 2**20:.0f} MiB, precomputed "
              f"{ours['peak_rss'] / 2**20:.0f} MiB: {base['peak_rss'] / ours['peak_rss']:.2f}x, "
              f"{(base['peak_rss'] - ours['peak_rss']) / 2**20:.0f} MiB saved")


if __name__ == "__main__":
    main()
