"""Child processes and /proc readings (bench.procs), with small real child processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import TYPE_CHECKING

import pytest
import trio

from bench import procs
from protocol.errors import UpstreamFailed

if TYPE_CHECKING:
    from pathlib import Path

BUSY_THEN_LISTEN = (
    "import time\n"
    "t = time.process_time()\n"
    "while time.process_time() - t < 0.05: pass\n"
    "print('listening on http://127.0.0.1:1', flush=True)\n"
    "time.sleep(30)\n"
)
IGNORE_TERM = (
    "import signal, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "print('listening on x', flush=True)\n"
    "time.sleep(30)\n"
)


def test_readings_of_this_process() -> None:
    """CPU and RSS of this process are positive; its tree starts with itself."""
    pid = os.getpid()
    cpu = procs.cpu_seconds(pid)
    rss = procs.rss_kib(pid)
    assert cpu is not None
    assert cpu > 0
    assert rss is not None
    assert rss > 1000
    assert procs.process_tree(pid)[0] == pid
    assert procs.own_cpu_seconds() > 0


def test_waiting_for_a_cpu_is_counted() -> None:
    """Two busy processes sharing one core: each waits for it, and run_queue_seconds says so."""
    if procs.own_run_queue_seconds() is None:
        pytest.skip("this kernel keeps no schedstat")
    cpu = min(os.sched_getaffinity(0))
    allowed = os.sched_getaffinity(0)
    child = subprocess.Popen(
        [sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 5: pass"]
    )
    try:
        os.sched_setaffinity(child.pid, {cpu})
        os.sched_setaffinity(0, {cpu})
        before = procs.own_run_queue_seconds()
        child_before = procs.run_queue_seconds(child.pid)
        busy_until = time.process_time() + 0.2  # 0.2 s of our own CPU on the shared core
        while time.process_time() < busy_until:
            pass
        after = procs.own_run_queue_seconds()
        child_after = procs.run_queue_seconds(child.pid)
    finally:
        os.sched_setaffinity(0, allowed)
        child.kill()
        child.wait()
    assert before is not None
    assert after is not None
    assert child_before is not None
    assert child_after is not None
    assert after > before  # we waited while the child ran
    assert child_after > child_before  # and it while we ran
    assert procs.run_queue_seconds(child.pid) is None  # reaped: gone


async def test_child_cpu_is_measured_and_child_is_stopped(tmp_path: Path) -> None:
    """A child's CPU time is read (ns clock), its URL read from stdout; stop_child ends it."""
    with trio.fail_after(10):
        child = await procs.start_child(
            "busy",
            [sys.executable, "-c", BUSY_THEN_LISTEN],
            str(tmp_path / "busy.log"),
            capture_stdout=True,
        )
        try:
            assert await procs.wait_listening(child) == "http://127.0.0.1:1"
            cpu = procs.cpu_seconds(child.pid)
            assert cpu is not None
            assert cpu >= 0.04
            assert procs.rss_kib(child.pid) is not None
        finally:
            await procs.stop_child(child)
    assert child.process.returncode == -signal.SIGTERM
    assert procs.cpu_seconds(child.pid) is None  # reaped: gone


async def test_child_ignoring_sigterm_is_killed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A child that ignores SIGTERM gets SIGKILL after the grace period."""
    monkeypatch.setattr(procs, "STOP_GRACE_S", 0.2)
    with trio.fail_after(10):
        child = await procs.start_child(
            "stubborn",
            [sys.executable, "-c", IGNORE_TERM],
            str(tmp_path / "s.log"),
            capture_stdout=True,
        )
        await procs.wait_listening(child)
        await procs.stop_child(child)
    assert child.process.returncode == -signal.SIGKILL


async def test_child_that_exits_is_reported_with_its_log(tmp_path: Path) -> None:
    """wait_port notices that the child died and shows the end of its output."""
    code = "import sys; print('bad flag --nope', file=sys.stderr); sys.exit(2)"
    with trio.fail_after(10):
        child = await procs.start_child(
            "relay", [sys.executable, "-c", code], str(tmp_path / "r.log")
        )
        try:
            with pytest.raises(UpstreamFailed, match="exited with status 2") as caught:
                await procs.wait_port(child, "127.0.0.1", procs.free_port(), timeout_s=5)
        finally:
            await procs.stop_child(child)
    assert "bad flag --nope" in caught.value.message


async def test_missing_program_is_an_upstream_failure(tmp_path: Path) -> None:
    """A program that does not exist cannot start: UpstreamFailed naming it."""
    with trio.fail_after(5), pytest.raises(UpstreamFailed, match="cannot start"):
        await procs.start_child("relay", [str(tmp_path / "no-such-program")], str(tmp_path / "l"))


async def test_python_m_child_imports_its_own_pythonpath_outside_our_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run in another directory, ``env PYTHONPATH=<other> python -m pkg`` imports <other>'s pkg.

    From a directory that holds a ``pkg`` of its own, ``python -m`` would import
    that one first (the working directory leads ``sys.path``): an A/B of
    two checkouts would then run one of them twice.
    """
    ours, other, elsewhere = tmp_path / "ours", tmp_path / "other", tmp_path / "logs"
    for root in (ours, other):
        (root / "abprobe").mkdir(parents=True)
        (root / "abprobe" / "__main__.py").write_text(
            f"print('listening on {root.name}', flush=True)\n"
        )
    elsewhere.mkdir()
    monkeypatch.chdir(ours)
    argv = ["env", f"PYTHONPATH={other}", sys.executable, "-m", "abprobe"]
    seen = {}
    with trio.fail_after(10):
        for label, cwd in (("here", None), ("elsewhere", str(elsewhere))):
            child = await procs.start_child(
                "probe",
                argv,
                str(tmp_path / f"{label}.log"),
                capture_stdout=True,
                cwd=cwd,
                env=procs.source_root_env(str(ours)),
            )
            try:
                seen[label] = await procs.wait_listening(child)
            finally:
                await procs.stop_child(child)
    assert seen == {"here": "ours", "elsewhere": "other"}


def test_source_root_env_puts_the_root_last() -> None:
    """The root follows any PYTHONPATH of ours, so a command's own setting still wins."""
    env = procs.source_root_env("/src")
    assert env["PYTHONPATH"].split(os.pathsep)[-1] == "/src"
