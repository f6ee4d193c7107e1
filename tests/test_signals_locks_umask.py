"""Faults around outputs: signals mid-merge, two runs to one OUT, what killed runs leave, the umask.

Each test checks the files a run leaves (or does not) with its own eyes: the directory listing
beside OUT, the bytes of OUT against a merge made alone, the mode bits against 0666/0777 less the
umask, and the exit status a real process reports.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import ADAPTERS, ROOT, TINY_LLAMA, run_cli
from helpers import sharded_model
from loratools.cli.interrupts import interrupts
from loratools.io import output_lock

LORA = ADAPTERS / "lora"


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def _hidden(d: Path) -> list[str]:
    """The hidden entries of ``d``: where temporaries, scratch files and locks would be."""
    return sorted(p.name for p in d.iterdir() if p.name.startswith("."))


def _one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def _default_signals() -> None:
    """In the child: the default actions, whatever the test runner ignores (a background job ignores SIGINT)."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


# ---- signals ----------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT], ids=lambda s: s.name)
def test_signal_mid_merge_removes_every_temporary(tmp_path: Path, sig: signal.Signals) -> None:
    """A real ``loratools merge --record`` sent SIGTERM/SIGHUP/SIGINT while it writes shards: exit 128 + the
    signal's number, one line, and nothing beside the inputs: no OUT, no record, no ``.out.tmp-*``, no
    scratch, no lock."""
    base, adapter = sharded_model(tmp_path)
    before = _digest(base), _digest(adapter)
    out, rec = tmp_path / "out", tmp_path / "rec.safetensors"
    proc = subprocess.Popen([sys.executable, "-m", "loratools", "-q", "merge", base, adapter, "-o", out,
                             "--record", rec, "--precision", "float64", "--device", "cpu"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_default_signals)
    deadline, sent = time.monotonic() + 120, False
    while time.monotonic() < deadline and proc.poll() is None:
        tmps = [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
        if tmps and any(f.suffix == ".safetensors" for f in tmps[0].iterdir()):
            proc.send_signal(sig)
            sent = True
            break
        time.sleep(0.002)
    _, stderr = proc.communicate(timeout=120)
    assert sent, "the merge finished before the signal could be sent"
    assert proc.returncode == 128 + sig, stderr
    assert _one_line(stderr) == f"loratools: interrupted ({sig.name}); nothing was written"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad.safetensors", "base"]
    assert (_digest(base), _digest(adapter)) == before


def test_interrupted_merge_waits_for_its_workers_before_removing_the_temporary(tmp_path: Path, monkeypatch) -> None:
    """In-process: a worker thread sends SIGTERM mid-merge, then keeps writing its tensor for a while and
    sends a second SIGTERM meanwhile (which must not cut the cleanup short). The CLI exits 143 with one
    line, every tensor write ended while the temporary still existed (none wrote into a removed one),
    no worker thread outlives the call, and the signal's handler is put back."""
    import loratools.io.model as model_io

    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        pytest.skip("this test runner handles SIGTERM itself")

    real, calls, ended_without_tmp = model_io._write_tensor, [], []
    lock = threading.Lock()

    def slow_write(*args, **kwargs):
        with lock:
            calls.append(1)
            n = len(calls)
        if n == 3:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)  # the main thread has the signal by now and waits while this tensor is still written
            if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
                ended_without_tmp.append(-n)  # the call returned before this thread ended: a second kill would end pytest
            else:
                os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)
        result = real(*args, **kwargs)
        if not any(p.name.startswith(".out.tmp-") for p in tmp_path.iterdir()):
            ended_without_tmp.append(n)
        return result

    monkeypatch.setattr(model_io, "_write_tensor", slow_write)
    r = run_cli("-q", "merge", TINY_LLAMA, LORA, "-o", tmp_path / "out", "--device", "cpu")
    assert r.returncode == 143, r.stderr
    assert _one_line(r.stderr) == "loratools: interrupted (SIGTERM); nothing was written"
    assert 3 <= len(calls) < 39 and ended_without_tmp == []
    assert os.listdir(tmp_path) == []
    assert not [t for t in threading.enumerate() if t.name.startswith("loratools-rewrite")]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # put back after the call


@pytest.mark.parametrize("when", ["begun", "not-yet-begun"])
def test_a_signal_while_a_worker_thread_starts_still_waits_for_that_thread(tmp_path: Path, monkeypatch,
                                                                           when: str) -> None:
    """The signal lands in the main thread just as it starts the merge's first worker thread: after the thread
    began, or while ``Thread.start`` still waits for it to begin (raised where the handler would raise: there, or in
    that wait). Either way the thread runs though the pool never listed it, and the run still waits for it: exit 143
    with one line, no tensor write ends after the temporary is removed, no worker thread outlives the call, nothing
    is left. (CI hit the second case for real: the join refused the thread that had not begun.)"""
    import loratools.io.model as model_io
    from loratools.cli.interrupts import Interrupted

    real_start, real_write, ended_without_tmp = threading.Thread.start, model_io._write_tensor, []

    def start(self: threading.Thread) -> None:
        if not self.name.startswith("loratools-rewrite"):
            return real_start(self)
        if when == "begun":
            real_start(self)
            raise Interrupted(signal.SIGTERM)
        begin = self._bootstrap_inner  # type: ignore[attr-defined]  # CPython 3.11 threading.py internals

        def late_begin() -> None:
            time.sleep(0.2)  # the OS thread runs but has not yet set its `_started`
            begin()

        def interrupted(timeout: float | None = None) -> bool:
            raise Interrupted(signal.SIGTERM)

        self._bootstrap_inner = late_begin  # type: ignore[attr-defined]
        self._started.wait = interrupted  # type: ignore[attr-defined]
        real_start(self)

    def slow_write(*args, **kwargs):
        time.sleep(0.3)  # still writing when the main thread has cleaned up, unless it waited
        result = real_write(*args, **kwargs)
        if not any(p.name.startswith(".out.tmp-") for p in tmp_path.iterdir()):
            ended_without_tmp.append(1)
        return result

    monkeypatch.setattr(threading.Thread, "start", start)
    monkeypatch.setattr(model_io, "_write_tensor", slow_write)
    r = run_cli("-q", "merge", TINY_LLAMA, LORA, "-o", tmp_path / "out", "--device", "cpu")
    assert r.returncode == 143, r.stderr
    assert _one_line(r.stderr) == "loratools: interrupted (SIGTERM); nothing was written"
    assert ended_without_tmp == []
    assert not [t for t in threading.enumerate() if t.name.startswith("loratools-rewrite")]
    assert os.listdir(tmp_path) == []


def test_an_ignored_sighup_stays_ignored() -> None:
    """``nohup loratools …`` ignores SIGHUP: the CLI must not take it over; the default actions it does take are put back."""
    saved = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    term = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        with interrupts():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN)
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGHUP, saved)
        signal.signal(signal.SIGTERM, term)


# ---- one run per output -----------------------------------------------------------------------------------

def test_a_run_to_an_output_another_run_holds_fails_at_once_and_writes_nothing(tmp_path: Path) -> None:
    """While the lock of OUT is held (as a live run holds it), a merge to OUT exits 2 with one line and
    leaves the holder's temporary alone; once released, the same merge succeeds and leaves no lock file."""
    out = tmp_path / "out"
    with output_lock(out):
        live = tmp_path / ".out.tmp-0123abcd"  # the holder's temporary, being written
        live.mkdir()
        r = run_cli("merge", TINY_LLAMA, LORA, "-o", out, "--device", "cpu")
        assert r.returncode == 2
        assert _one_line(r.stderr) == (f"loratools: error: {out} is being written by another loratools run; "
                                       "wait for it to finish or choose another output")
        assert not out.exists() and live.is_dir() and _hidden(tmp_path) == [".out.lock", ".out.tmp-0123abcd"]
        live.rmdir()
    assert _hidden(tmp_path) == []
    r = run_cli("-q", "merge", TINY_LLAMA, LORA, "-o", out, "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert out.is_dir() and _hidden(tmp_path) == []


@pytest.mark.slow
def test_two_processes_to_one_output_one_wins_whole(tmp_path: Path) -> None:
    """Two real merges started together to one OUT: one exits 0, the other 2 with one line (busy, or OUT
    already exists if it came second); OUT is byte for byte the merge made alone."""
    alone = tmp_path / "alone"
    assert run_cli("-q", "merge", TINY_LLAMA, LORA, "-o", alone, "--device", "cpu").returncode == 0
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "loratools", "-q", "merge", TINY_LLAMA, LORA, "-o", out, "--device", "cpu"]
    procs = [subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = sorted((p.wait(timeout=300), p.stderr.read()) for p in procs)  # type: ignore[union-attr]
    assert [code for code, _ in results] == [0, 2], results
    line = _one_line(results[1][1])
    assert line in (f"loratools: error: {out} is being written by another loratools run; wait for it to "
                    "finish or choose another output", f"loratools: error: {out} already exists; pass --force to replace it")
    assert _digest(out) == _digest(alone)
    assert _hidden(tmp_path) == []


# ---- what killed runs leave -------------------------------------------------------------------------------

def test_stale_temporaries_of_killed_runs_are_swept_by_the_next_run(tmp_path: Path) -> None:
    """What a SIGKILLed ``merge --record`` leaves (a half-written ``.out.tmp-*`` directory, the record's
    temporary and scratch, a lock file) is removed by the next run to the same outputs; look-alike
    names of other outputs stay."""
    out, rec = tmp_path / "out", tmp_path / "rec.safetensors"
    stale = tmp_path / ".out.tmp-deadbeef"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 1000)
    for name in (".rec.safetensors.tmp-0badf00d", ".rec.safetensors.scratch-4194303", ".out.lock"):
        (tmp_path / name).write_bytes(b"x")
    others = [".out.tmp-1.tmp-abcdef12", ".outx.tmp-deadbeef", ".out.tmp-notmine", "out.tmp-deadbeef"]
    for name in others:
        (tmp_path / name).write_bytes(b"y")
    r = run_cli("-q", "merge", TINY_LLAMA, LORA, "-o", out, "--record", rec, "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", "rec.safetensors", *others])


def test_a_run_killed_between_its_two_renames_gets_its_old_output_back(tmp_path: Path) -> None:
    """A ``--force`` run killed after moving the old OUT aside (``.out.old-*``) and before renaming the new
    one in: the next run puts the old OUT back (the killed run never finished), removes the unfinished
    new one, and refuses to replace it without ``--force``."""
    out = tmp_path / "out"
    old, new = tmp_path / ".out.old-12345678", tmp_path / ".out.tmp-87654321"
    old.mkdir()
    (old / "config.json").write_text("{}")
    new.mkdir()
    r = run_cli("merge", TINY_LLAMA, LORA, "-o", out, "--device", "cpu")
    assert r.returncode == 2
    assert _one_line(r.stderr) == f"loratools: error: {out} already exists; pass --force to replace it"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (out / "config.json").read_text() == "{}"


# ---- the umask --------------------------------------------------------------------------------------------

def _modes(root: Path) -> dict[str, str]:
    paths = [root, *root.rglob("*")] if root.is_dir() else [root]
    return {str(p.relative_to(root.parent)): oct(stat.S_IMODE(p.stat().st_mode)) for p in paths}


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002], ids=oct)
def test_outputs_are_created_with_the_umask(tmp_path: Path, umask: int) -> None:
    """Every file written (merged shards, copied config and tokenizer, record, converted adapters) is 0666
    less the umask and every directory 0777 less it, as ``cp`` makes new files: not the source's modes
    (the fixture's 0644 config), not a fixed 0644/0600."""
    old = os.umask(umask)
    try:
        assert run_cli("-q", "merge", TINY_LLAMA, LORA, "-o", tmp_path / "m", "--record", tmp_path / "r.safetensors",
                       "--device", "cpu").returncode == 0
        assert run_cli("-q", "convert", ADAPTERS / "lora.safetensors", "-o", tmp_path / "p", "--to", "peft",
                       "--base", TINY_LLAMA).returncode == 0
        assert run_cli("-q", "convert", LORA, "-o", tmp_path / "k.safetensors", "--to", "kohya").returncode == 0
        assert run_cli("-q", "convert", LORA, "-o", tmp_path / "g.gguf", "--to", "gguf", "--base",
                       TINY_LLAMA).returncode == 0
    finally:
        os.umask(old)
    modes = {}
    for name in ("m", "r.safetensors", "p", "k.safetensors", "g.gguf"):
        modes.update(_modes(tmp_path / name))
    want = {k: oct(0o777 & ~umask) if (tmp_path / k).is_dir() else oct(0o666 & ~umask) for k in modes}
    assert len(modes) >= 11 and modes == want
