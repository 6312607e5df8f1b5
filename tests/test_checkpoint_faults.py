"""Torn, corrupt and foreign checkpoints, and a checkpoint write that fails (a real EFBIG from a
file-size limit in a child process): resume falls back to the newest good checkpoint and says so,
and a failed write leaves the previous checkpoint intact."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from searchrl.errors import SearchRLError
from searchrl.training import checkpoint as ck
from searchrl.training.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint


def _run(tmp_path: Path, steps=(0, 1, 2, 3), width: int = 8) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.Linear(width, 2))
    run = tmp_path / "run"
    for s in steps:
        with torch.no_grad():
            model[0].bias.fill_(float(s))
        save_checkpoint(run, s, model, None, {"optimizer": {"s": s}}, keep=10)
    return run, model


def _names(paths) -> list[str]:
    return [p.name for p in paths]


@pytest.fixture(autouse=True)
def _fresh_warnings():
    ck._warned.clear()


def test_truncated_weights_fall_back_with_a_warning(tmp_path, caplog):
    run, model = _run(tmp_path)
    f = run / "checkpoints" / "step-000003" / "policy.safetensors"
    f.write_bytes(f.read_bytes()[:-10])  # torn write: COMPLETE is there, the bytes are not
    with caplog.at_level(logging.WARNING, logger="searchrl.training.checkpoint"):
        good = list_checkpoints(run)
    assert _names(good) == ["step-000000", "step-000001", "step-000002"]
    assert "step-000003 is unusable (unreadable" in caplog.text and "truncated" in caplog.text
    state = load_checkpoint(good[-1], model, None)
    assert state["step"] == 2 and model[0].bias.detach()[0].item() == 2.0


@pytest.mark.parametrize("damage", ["no-complete", "cut-state", "garbage-header", "missing-state", "empty"])
def test_damaged_newest_checkpoint_is_skipped(tmp_path, damage):
    run, _ = _run(tmp_path)
    d = run / "checkpoints" / "step-000003"
    if damage == "no-complete":
        (d / "COMPLETE").unlink()
    elif damage == "cut-state":
        raw = (d / "state.pt").read_bytes()
        (d / "state.pt").write_bytes(raw[: len(raw) // 2])
    elif damage == "garbage-header":
        (d / "policy.safetensors").write_bytes(b"\xff" * 64)
    elif damage == "missing-state":
        (d / "state.pt").unlink()
    else:
        (d / "policy.safetensors").write_bytes(b"")
    assert _names(list_checkpoints(run))[-1] == "step-000002"


def test_checkpoint_of_another_model_is_skipped(tmp_path, caplog):
    run, _ = _run(tmp_path)
    other, _ = _run(tmp_path / "other", steps=(3,), width=4)  # another shape: another model
    target = run / "checkpoints" / "step-000003"
    import shutil

    shutil.rmtree(target)
    shutil.copytree(other / "checkpoints" / "step-000003", target)
    with caplog.at_level(logging.WARNING):
        assert _names(list_checkpoints(run))[-1] == "step-000002"
    assert "weights of another model" in caplog.text


def test_loading_into_a_mismatched_model_is_a_clear_error(tmp_path):
    run, _ = _run(tmp_path)
    wrong = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    with pytest.raises(SearchRLError, match="does not match the model"):
        load_checkpoint(run / "checkpoints" / "step-000001", wrong, None)


def test_write_failure_leaves_previous_checkpoint_intact(tmp_path):
    """A child process writes step 1, then caps its file size (RLIMIT_FSIZE, SIGXFSZ ignored) so
    the step-2 write fails inside safetensors with EFBIG, as on a full disk."""
    run = tmp_path / "run"
    code = textwrap.dedent(f"""
        import json, resource, signal, torch
        from searchrl.training.checkpoint import save_checkpoint, list_checkpoints
        from searchrl.errors import SearchRLError
        m = torch.nn.Linear(64, 64)
        save_checkpoint({str(run)!r}, 1, m, None, {{"x": 1}})
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4000, resource.RLIM_INFINITY))
        try:
            save_checkpoint({str(run)!r}, 2, m, None, {{"x": 2}})
            msg = None
        except SearchRLError as e:
            msg = str(e)
        print(json.dumps({{"error": msg, "good": [p.name for p in list_checkpoints({str(run)!r})]}}))
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["error"] and "could not write checkpoint step 2" in out["error"]
    assert "step-000001 is intact" in out["error"] and "File too large" in out["error"]
    assert out["good"] == ["step-000001"]
    left = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert left == ["step-000001"]  # no half-written step-000002 and no .tmp left behind
    state = torch.load(run / "checkpoints" / "step-000001" / "state.pt", weights_only=False)
    assert state["step"] == 1


def test_failed_write_from_monkeypatched_save_cleans_up(tmp_path, monkeypatch):
    run, _ = _run(tmp_path, steps=(0, 1))

    def full_disk(obj, f, *a, **k):
        Path(f).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ck.torch, "save", full_disk)
    with pytest.raises(SearchRLError, match="No space left on device; [0-9,]+ MB free on its disk.*step-000001 is intact"):
        save_checkpoint(run, 2, torch.nn.Linear(8, 8), None, {})
    assert _names(list_checkpoints(run)) == ["step-000000", "step-000001"]
    assert not any(p.name.endswith(".tmp") for p in (run / "checkpoints").iterdir())


def test_final_model_export_on_a_full_disk_is_a_clear_error_and_keeps_the_earlier_export(tmp_path):
    from types import SimpleNamespace

    from searchrl.training.pipeline import export_model

    class FullDisk:
        def save_pretrained(self, folder, state_dict=None):
            Path(folder).mkdir(parents=True)
            (Path(folder) / "model.safetensors").write_bytes(b"partial")
            raise OSError(28, "No space left on device")

    earlier = tmp_path / "model"
    earlier.mkdir()
    (earlier / "config.json").write_text("{}")
    models = SimpleNamespace(policy=FullDisk(), uses_lora=False, tokenizer=None)
    with pytest.raises(SearchRLError, match=r"model .*No space left on device; [0-9,]+ MB free.*--resume"):
        export_model(models, earlier)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no model.tmp left behind
    assert (earlier / "config.json").read_text() == "{}"
