"""One run directory, one writer: a second launch into a run directory in use is refused, naming the holder."""

import json
import os
import socket
import subprocess
import sys

import pytest

from rayalign.config import ConfigError
from rayalign.run_lock import LOCK_FILE, run_dir_lock

HOLD = ("import sys, time\nfrom pathlib import Path\nfrom rayalign.run_lock import run_dir_lock\n"
        "with run_dir_lock(Path(sys.argv[1])):\n    print('held', flush=True)\n    time.sleep(60)\n")


def test_a_held_lock_refuses_another_process_and_is_released(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError) as refused:
            with run_dir_lock(tmp_path):
                pass
        assert f"in use by process {holder.pid} on {socket.gethostname()}" in str(refused.value)
        assert str(tmp_path / LOCK_FILE) in str(refused.value)
    finally:
        holder.kill()
        holder.wait()
    with run_dir_lock(tmp_path, announce=lambda message: None):  # the killed holder's lock is stale now
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_stale_lock_is_taken_over_only_on_its_own_host(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    lock = tmp_path / LOCK_FILE
    lock.write_text(json.dumps({"pid": gone.pid, "host": socket.gethostname(), "since": "earlier"}))
    said = []
    with run_dir_lock(tmp_path, announce=said.append):
        pass
    assert said == [f"{lock}: removed the stale lock of process {gone.pid} (no longer running)"]
    lock.write_text(json.dumps({"pid": gone.pid, "host": "node-7", "since": "2026-11-29 10:00:00"}))
    with pytest.raises(ConfigError, match=f"in use by process {gone.pid} on node-7 since 2026-11-29 10:00:00"):
        with run_dir_lock(tmp_path):
            pass
    assert lock.exists()  # another host's lock is never broken


def test_two_launches_taking_over_one_stale_lock_do_not_remove_each_others(tmp_path, monkeypatch):
    """Both found the dead holder's lock; the first removed it and wrote its own, then the second removed that one
    too (it had read the dead holder before): two runs held the directory."""
    import rayalign.run_lock as run_lock

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    first = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # the launch that came first
    lock, host = tmp_path / LOCK_FILE, socket.gethostname()
    lock.write_text(json.dumps({"pid": gone.pid, "host": host, "since": "earlier"}))
    real_alive = run_lock._alive

    def alive(pid):  # as this launch finds the holder dead, the first launch takes the lock over
        if pid == gone.pid:
            lock.write_text(json.dumps({"pid": first.pid, "host": host, "since": "now"}))
        return real_alive(pid)

    monkeypatch.setattr(run_lock, "_alive", alive)
    try:
        with pytest.raises(ConfigError, match=f"in use by process {first.pid} on {host} since now"):
            with run_dir_lock(tmp_path, announce=lambda message: None):
                pass
        assert json.loads(lock.read_text())["pid"] == first.pid
    finally:
        first.kill()
        first.wait()


@pytest.mark.parametrize("text", ['{"pid": "abc", "host": "h"}', '[1]', '{"pid": [1], "host": "h"}'])
def test_a_damaged_lock_file_is_named_not_a_traceback(tmp_path, text):
    (tmp_path / LOCK_FILE).write_text(text)
    with pytest.raises(ConfigError, match="in use by a process that left an unreadable lock file"):
        with run_dir_lock(tmp_path):
            pass


def test_a_launch_into_a_run_directory_in_use_is_refused_before_any_work(tmp_path, tiny_model):
    """Another process holds the run directory (as a running launch does): `rayalign launch` into it exits 2
    naming that process, writes nothing (the running run's plan.json was overwritten), and leaves the holder's lock
    alone."""
    from conftest import PROMPTS_DIR

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"name: lock\nlanguages: [en, de]\npolicy: {{path: {tiny_model}}}\n"
                      f"prompts: {{path: {PROMPTS_DIR}, limit: 2}}\nsampling: {{n: 2, max_new_tokens: 8}}\n")
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        (run_dir / "plan.json").write_text('{"recipe": "the running one"}')  # as the running launch saved it
        second = subprocess.run([sys.executable, "-m", "rayalign.cli", "launch", "--cluster", "local", str(recipe),
                                 "--run-dir", str(run_dir)], capture_output=True, text=True, env=env, timeout=300)
        assert second.returncode == 2, second.stdout + second.stderr
        assert f"in use by process {holder.pid} on {socket.gethostname()}" in second.stdout + second.stderr
        assert "Traceback" not in second.stdout + second.stderr
        assert sorted(p.name for p in run_dir.iterdir()) == ["plan.json", LOCK_FILE]  # no state, no datasets
        assert (run_dir / "plan.json").read_text() == '{"recipe": "the running one"}'  # was overwritten
        assert json.loads((run_dir / LOCK_FILE).read_text())["pid"] == holder.pid
    finally:
        holder.kill()
        holder.wait()
