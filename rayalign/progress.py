"""What a user sees during waits: progress bars over shards, and lines before model builds and one-time op
compiles that would otherwise be silent."""

from __future__ import annotations

import contextlib
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

console = Console(stderr=True)


def model_build_progress(name: str = "the tiny offline model"):
    """Progress printer for the first build of a tiny model (cached afterwards)."""
    shown = {"last": 0}

    def progress(step, total, loss):
        if step == 1:
            console.print(f"building {name} (first use only, about 1-5 min on 2 CPU cores; cached afterwards)")
        if step - shown["last"] >= max(1, total // 10) or step == total:
            shown["last"] = step
            console.print(f"  tiny model training step {step}/{total}  loss {loss:.3f}")

    return progress


def deepspeed_op_notice() -> None:
    """DeepSpeed's CPU accelerator compiles its shared-memory comm op on first use; say so before it happens."""
    import torch

    if torch.cuda.is_available():
        return
    from torch.utils.cpp_extension import _get_build_directory

    build_dir = Path(_get_build_directory("deepspeed_shm_comm", verbose=False))
    if not (build_dir / "deepspeed_shm_comm.so").is_file():
        console.print(f"DeepSpeed compiles its CPU communication op on first use (about 70-90 s on 2 CPU cores, "
                      f"cached in {build_dir})")


def progress_bar(label: str, total: int, unit: str, done: int = 0):
    """A progress bar context; yields an update(stats) callback for run_shards (`done`: resumed rows)."""

    @contextlib.contextmanager
    def bar():
        with Progress(TextColumn(label), BarColumn(), TextColumn("{task.fields[status]}"), TimeElapsedColumn(),
                      console=console) as progress:
            task = progress.add_task(label, total=total, completed=done, status=f"{done}/{total} {unit}")

            def update(stats):
                rows = done + stats.rows_in
                rate = stats.rows_out / max(stats.seconds, 1e-9)
                progress.update(task, completed=rows, status=f"{rows}/{total} {unit} | {rate:.1f} rows out/s")

            yield update

    return bar()
