"""Reading a run directory's state.json: what the run finished and the checksums it recorded."""

from __future__ import annotations

import json
from pathlib import Path

from rayalign.config import ConfigError


def read_state(run_dir: Path) -> dict | None:
    """The run state in `run_dir`, None when there is none; a damaged one is refused naming the file and what to
    do (rayalign replaces state.json atomically, so a damaged one was changed outside a run)."""
    path = Path(run_dir) / "state.json"
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        problem = None
    except (OSError, UnicodeDecodeError) as e:
        state, problem = None, f"cannot be read ({e})"
    except ValueError as e:
        state, problem = None, f"is not valid JSON ({e}; truncated or edited?)"
    if problem is None:
        if not isinstance(state, dict):
            problem = f"holds a JSON {type(state).__name__}, not an object"
        elif not isinstance(state.get("config_hash"), str):
            problem = "has no config_hash"
        elif not (isinstance(state.get("finished"), list) and all(isinstance(s, str) for s in state["finished"])):
            problem = "has no list of finished stages"
    if problem:
        raise ConfigError(
            f"{path}: {problem}. rayalign replaces this file whole, so it was damaged outside a run. Restore it "
            f"from a backup, or move it aside and launch again: every stage then runs again, keeping the shards "
            f"whose checksum files match; training checkpoints and saved policies are recomputed, since their "
            f"checksums were recorded in this file")
    return state
