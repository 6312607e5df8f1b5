"""The output-folder lock (two processes on one --out are refused) and the SIGTERM/SIGINT stop flag.

The lock is taken by a real second process; the signal handler gets real signals sent to this
process. The end-to-end SIGTERM run (checkpoint, exit 2, exact resume) is in test_resume.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from searchrl.errors import SearchRLError
from searchrl.runlock import LOCK_NAME, hold_run_lock, release_run_lock
from searchrl.training.signals import StopOnSignal, TrainingStopped


def _holder(folder) -> subprocess.Popen:
    code = textwrap.dedent(f"""
        import sys, time
        from searchrl.runlock import hold_run_lock
        hold_run_lock({str(folder)!r})
        print("locked", flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_process_is_refused_and_the_lock_dies_with_its_holder(tmp_path):
    out = tmp_path / "run"
    proc = _holder(out)
    try:
        with pytest.raises(SearchRLError, match=f"in use by pid {proc.pid}.*another --out"):
            hold_run_lock(out)
    finally:
        proc.send_signal(signal.SIGKILL)  # no clean-up: the kernel drops the flock
        proc.wait()
    assert (out / LOCK_NAME).exists()
    hold_run_lock(out)  # a crashed holder leaves no stale lock
    assert (out / LOCK_NAME).read_text() == str(os.getpid())
    release_run_lock(out)


def test_lock_is_reentrant_in_one_process_and_released(tmp_path):
    out = tmp_path / "run"
    hold_run_lock(out)
    hold_run_lock(out)
    release_run_lock(out)
    proc = _holder(out)  # released: another process can take it
    proc.kill()
    proc.wait()


def test_eval_refuses_an_out_folder_in_use(tmp_path, capsys):
    from searchrl.cli import main

    out = tmp_path / "eval"
    data = tmp_path / "nq_test.jsonl"
    data.write_text('{"id": "1", "question": "q?", "golden_answers": ["a"]}\n')
    proc = _holder(out)
    try:
        code = main(["eval", "--data", str(data), "--model", "none", "--method", "direct", "--out", str(out),
                     "--no-progress"])
    finally:
        proc.kill()
        proc.wait()
    assert code == 2 and f"in use by pid {proc.pid}" in capsys.readouterr().err
    assert not (out / "trajectories.jsonl").exists() and not (out / "eval_config.json").exists()


def _wait_for(done, seconds: float = 10.0) -> None:
    """Poll until ``done()`` or the deadline: a signal's Python handler runs on the main thread
    between bytecodes, which on a loaded machine can be later than a fixed short sleep (a 0.5 s
    sleep once missed the KeyboardInterrupt with four jobs on two cores)."""
    deadline = time.monotonic() + seconds
    while not done() and time.monotonic() < deadline:
        time.sleep(0.01)


def test_stop_flag_set_by_sigterm_and_handlers_restored():
    before = signal.getsignal(signal.SIGTERM)
    with StopOnSignal() as stop:
        assert not stop.should_stop()
        stop.check(1, "ckpt")  # nothing received: no exception
        os.kill(os.getpid(), signal.SIGTERM)
        _wait_for(stop.should_stop)
        assert stop.should_stop()
        with pytest.raises(TrainingStopped, match="stopped by SIGTERM after step 3; checkpoint ck written.*--resume"):
            stop.check(3, "ck")
    assert signal.getsignal(signal.SIGTERM) is before


def test_second_sigint_goes_to_the_previous_handler():
    # start from Python's own SIGINT handler whatever an earlier test left installed (in the full
    # suite this test missed its KeyboardInterrupt twice while passing alone: order-dependent)
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _second_sigint_goes_to_the_previous_handler()
    finally:
        signal.signal(signal.SIGINT, inherited)


def _second_sigint_goes_to_the_previous_handler():
    with StopOnSignal() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        _wait_for(stop.should_stop)
        assert stop.should_stop()
        with pytest.raises(KeyboardInterrupt):  # Python's own SIGINT handler: stop now
            os.kill(os.getpid(), signal.SIGINT)
            _wait_for(lambda: False)  # the handler runs between these bytecodes and raises
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
