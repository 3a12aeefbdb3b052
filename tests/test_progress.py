"""Waits longer than a few seconds are announced before they start."""

from rayalign.progress import deepspeed_op_notice, model_build_progress


def test_deepspeed_op_build_is_announced_only_when_not_yet_cached(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    deepspeed_op_notice()
    assert "compiles its CPU communication op" in capsys.readouterr().err
    (tmp_path / "deepspeed_shm_comm" / "deepspeed_shm_comm.so").write_bytes(b"")
    deepspeed_op_notice()
    assert capsys.readouterr().err == ""


def test_model_build_names_the_model_and_reports_steps(capsys):
    progress = model_build_progress("builtin:tiny-multilingual?train_steps=100")
    for step in range(1, 101):
        progress(step, 100, 1.0 / step)
    text = capsys.readouterr().err
    header, _, steps = text.partition("  tiny model")
    assert "builtin:tiny-multilingual?train_steps=100" in header and "cached afterwards" in header.replace("\n", " ")
    assert [line.split()[4] for line in text.splitlines() if "training step" in line] == [
        f"{s}/100" for s in range(10, 101, 10)]
