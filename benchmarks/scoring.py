"""Scoring speed, in one run on the same model and samples.

1. Teacher-forced scoring: rayalign's pass (rows sorted by length, one forward per batch returning
   log-probs and pooled states at the hub and language layers together) against a baseline that
   scores like the released code: fixed batch size in the given order, right padding, and a
   separate forward for each quantity (log-probs, hub-layer states, last-layer states).
   Both must give the same numbers.
2. Per-language alpha search (ICR): the envelope search (per prompt, the chosen and rejected samples
   as upper and lower envelopes of the lines base - a * length) against the released code's loop over
   1000 grid values (and over prompts inside it), on 10^5 samples. Both must choose the same alpha.

    python benchmarks/scoring.py [--samples 640] [--alpha-samples 100000] [--only scoring|alpha]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


def baseline_scores(engine, requests, hub: int, last: int, batch_size: int):
    """Released-code style: fixed batches in order, right padding, one forward per quantity."""
    model, tok = engine.model, engine.tokenizer
    encoded = [engine.encode_score(r) for r in requests]
    logps, pooled_hub, pooled_last = [], [], []
    for quantity in ("logp", hub, last):
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start: start + batch_size]
            width = max(len(p) + len(r) for p, r in chunk)
            ids = torch.tensor([p + r + [tok.pad_token_id] * (width - len(p) - len(r)) for p, r in chunk])
            mask = torch.tensor([[1] * (len(p) + len(r)) + [0] * (width - len(p) - len(r)) for p, r in chunk])
            with torch.inference_mode():
                out = model(input_ids=ids, attention_mask=mask, output_hidden_states=quantity != "logp")
            for b, (p, r) in enumerate(chunk):
                span = slice(len(p), len(p) + len(r))
                if quantity == "logp":
                    lp = torch.log_softmax(out.logits[b, len(p) - 1: len(p) + len(r) - 1].float(), -1)
                    logps.append(lp.gather(-1, torch.tensor(r)[:, None]).sum().item())
                else:
                    (pooled_hub if quantity == hub else pooled_last).append(
                        out.hidden_states[quantity][b, span].float().mean(0).numpy())
    return logps, pooled_hub, pooled_last


def alpha_search_released_loop(base, lengths, group_ids, grid):
    """The released code's way: a Python loop over grid values and, inside, over prompts."""
    groups: dict = {}
    for i, g in enumerate(group_ids):
        groups.setdefault(g, []).append(i)
    members = [np.asarray(v) for v in groups.values()]
    best, best_obj = None, np.inf
    for a in grid:
        diffs = []
        for idx in members:
            r = base[idx] - a * lengths[idx]
            diffs.append(lengths[idx[np.argmax(r)]] - lengths[idx[np.argmin(r)]])
        obj = abs(np.mean(diffs))
        if obj < best_obj:
            best, best_obj = a, obj
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=640, help="samples to score (from the bundled prompts)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--alpha-samples", type=int, default=100_000)
    ap.add_argument("--model", default=None, help="model directory (default: the cached tiny model)")
    ap.add_argument("--only", choices=["scoring", "alpha"], default=None, help="run one of the two parts")
    args = ap.parse_args()
    torch.set_num_threads(2)
    if args.only != "alpha":
        bench_scoring(args)
    if args.only != "scoring":
        bench_alpha_search(args.alpha_samples)


def bench_scoring(args) -> None:

    from rayalign.config import load_config
    from rayalign.data.prompts import load_prompts
    from rayalign.engines import ScoreRequest
    from rayalign.engines.hf import HFEngine
    from rayalign.generation import generate_samples
    from rayalign.models import ensure_tiny_model

    model = args.model or str(ensure_tiny_model())
    cfg = load_config(REPO / "examples" / "quickstart.yaml", [f"policy.path={model}", "sampling.max_new_tokens=64"])
    prompts = load_prompts(cfg.prompts.path, cfg.languages,
                           **{**cfg.prompts.load_kwargs(), "limit": -(-args.samples // (cfg.sampling.n * 5))})
    engine = HFEngine(model, batch_size=args.batch_size)
    samples = generate_samples(engine, prompts, cfg.sampling, 1, "bench").slice(0, args.samples).to_pylist()
    requests = [ScoreRequest(s["messages"], s["response"]) for s in samples]
    layers = engine.model.config.num_hidden_layers
    hub, last = layers // 2, layers
    tokens = sum(len(p) + len(r) for p, r in map(engine.encode_score, requests))
    print(f"scoring {len(requests)} samples ({tokens} tokens), batch {args.batch_size}, layers {hub} and {last}")

    engine.score(requests[:4], [hub, last])  # warm-up
    started = time.perf_counter()
    ours = engine.score(requests, [hub, last])
    ours_s = time.perf_counter() - started
    started = time.perf_counter()
    base_logp, base_hub, base_last = baseline_scores(engine, requests, hub, last, args.batch_size)
    base_s = time.perf_counter() - started
    max_dlogp = max(abs(o.logp - b) for o, b in zip(ours, base_logp))
    max_dpool = max(float(np.abs(o.pooled[hub] - b).max()) for o, b in zip(ours, base_hub))
    max_dpool = max(max_dpool, max(float(np.abs(o.pooled[last] - b).max()) for o, b in zip(ours, base_last)))
    print(f"  rayalign (sorted, one pass) {tokens / ours_s:10.0f} tokens/s  {ours_s:7.2f} s")
    print(f"  released-code style         {tokens / base_s:10.0f} tokens/s  {base_s:7.2f} s")
    print(f"  speed-up {base_s / ours_s:.2f}x (goal >= 2x); max |d logp| {max_dlogp:.2e}, max |d pooled| "
          f"{max_dpool:.2e}")


def bench_alpha_search(samples: int) -> None:
    from rayalign.rewards.implicit import alpha_search

    rng = np.random.default_rng(0)
    n_per_group = 10
    groups = np.repeat(np.arange(samples // n_per_group), n_per_group)
    lengths = rng.integers(20, 2000, size=groups.size).astype(np.float64)
    base = rng.normal(size=groups.size) * 50 + 0.3 * lengths  # a reward that favours long answers
    grid = np.arange(1000) / 1000
    alpha_search(base[:1000], lengths[:1000], groups[:1000], grid)  # warm-up
    fast_s = np.inf
    for _ in range(3):  # best of three: the envelope search takes well under a second
        started = time.perf_counter()
        fast_alpha, _ = alpha_search(base, lengths, groups, grid)
        fast_s = min(fast_s, time.perf_counter() - started)
    started = time.perf_counter()
    loop_alpha = alpha_search_released_loop(base, lengths, groups, grid)
    loop_s = time.perf_counter() - started
    print(f"\nalpha search on {groups.size} samples ({groups.max() + 1} prompts) x {grid.size} grid values")
    print(f"  envelopes {fast_s:7.3f} s   released-code loop {loop_s:7.2f} s   speed-up {loop_s / fast_s:.0f}x "
          f"(goal >= 100x); alpha {fast_alpha} vs {loop_alpha}")
    if fast_alpha != loop_alpha:
        raise SystemExit("the envelope search chose another alpha than the loop")


if __name__ == "__main__":
    main()
