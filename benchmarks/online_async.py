"""Online step time, synchronous against one step off the policy (online.async_train), in one process on the same
machine: the quickstart's GRPO recipe on the tiny model, the same steps each way. A step's wall time is the sum
of its logged phases (generate = the wait for its rollouts, reward, train, sync); step 1 generates synchronously
in both modes and is left out of the means.

    python benchmarks/online_async.py [--steps 5] [--model DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PHASES = ("seconds_generate", "seconds_reward", "seconds_train", "seconds_sync")


def run(model: str, steps: int, one_step_off: bool, run_dir: Path) -> list[dict]:
    from rayalign.config import load_config
    from rayalign.pipelines import online

    cfg = load_config(REPO / "examples" / "online-grpo-quickstart.yaml", [
        f"policy.path={model}", f"online.steps={steps}", f"online.async_train={str(one_step_off).lower()}"])
    online.run(cfg, run_dir)
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if json.loads(line).get("stage") == "online"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--model", help="policy directory (default: the builtin tiny model)")
    args = parser.parse_args()
    import ray

    from rayalign.models import ensure_tiny_model

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    model = args.model or str(ensure_tiny_model())
    means = {}
    with tempfile.TemporaryDirectory() as tmp:
        print(f"{'mode':<12} " + " ".join(f"{p.removeprefix('seconds_'):>9}" for p in PHASES) + f" {'step s':>8}")
        for mode, one_step_off in (("sync", False), ("one-step-off", True)):
            later = run(model, args.steps, one_step_off, Path(tmp) / mode)[1:]
            phase = {p: sum(s[p] for s in later) / len(later) for p in PHASES}
            means[mode] = sum(phase.values())
            print(f"{mode:<12} " + " ".join(f"{phase[p]:9.2f}" for p in PHASES) + f" {means[mode]:8.2f}")
    print(f"one-step-off / sync step time: {means['one-step-off'] / means['sync']:.2f} "
          f"({means['sync'] / means['one-step-off']:.2f}x speed-up), steps 2..{args.steps}, {os.cpu_count()} CPUs")
    ray.shutdown()


if __name__ == "__main__":
    main()
