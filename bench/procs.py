"""Child processes of ``bench overhead``: start, watch through /proc, always stop.

Theory of operation
-------------------
The emulator and the relay run as separate processes on loopback so that
the relay's own CPU time and memory can be read from ``/proc`` without the
emulator's or the client's mixed in:

- CPU: user plus system time, summed over the process and its live
  descendants (a relay started through a wrapper, or with worker
  processes, is counted whole). It is the quantity ``utime + stime`` of
  ``/proc/<pid>/stat`` counts, but read from the process's Linux CPU-time
  clock (``clock_gettime`` on the id ``clock_getcpuclockid`` would give),
  which has nanosecond resolution instead of the 10 ms clock tick; where
  that clock cannot be read, ``/proc/<pid>/stat`` is the fallback.
- Memory: ``VmRSS`` of ``/proc/<pid>/status`` (KiB), summed the same way.

Lifecycle: :func:`start_child` opens the process in its own session (a
Ctrl-C in the terminal reaches only the benchmark, which then stops its
children itself). Its output goes to a log file, whose tail is shown when a
child fails to start. :func:`stop_child` sends SIGTERM, waits a bounded
time, then SIGKILL; it is shielded, so it also runs when the run is being
cancelled. Callers use it in ``finally``; ``bench overhead`` also turns its
own SIGTERM into a cancellation, so the children are stopped then too.

Trap: Linux's ``PR_SET_PDEATHSIG`` looks like the way to tie a child's life
to ours, but it fires when the *thread* that forked the child exits, and
trio forks from a worker thread that retires after a few idle seconds: the
children would be killed in the middle of a run. It is not used.

File descriptors: 1,000 idle streams need about 1,000 fds in the client,
2,000 in the relay and 1,000 in the emulator. The bench raises the soft
``RLIMIT_NOFILE`` to the hard limit (``relay.cli.raise_open_files_limit``,
which the relay also does for itself); children inherit it.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from typing import IO

import trio

from protocol.errors import UpstreamFailed

#: How long a child may take to say it is ready.
START_TIMEOUT_S = 30.0
#: How long a child gets between SIGTERM and SIGKILL.
STOP_GRACE_S = 3.0
_LISTENING_RE = re.compile(rb"listening on (\S+)")
_LOG_TAIL_BYTES = 2000
#: ``CPUCLOCK_SCHED`` of Linux's posix-cpu-timers: the scheduler's runtime.
_CPUCLOCK_SCHED = 2


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(slots=True)
class Child:
    """A running child process and its log file."""

    name: str
    process: trio.Process
    log_path: str
    log_file: IO[bytes]

    @property
    def pid(self) -> int:
        """The process id."""
        return self.process.pid

    def log_tail(self) -> str:
        """The last lines of the child's output (for error messages)."""
        with contextlib.suppress(OSError), open(self.log_path, "rb") as log:
            log.seek(0, os.SEEK_END)
            size = log.tell()
            log.seek(max(0, size - _LOG_TAIL_BYTES))
            return log.read().decode("utf-8", "replace")
        return ""


def source_root_env(root: str) -> dict[str, str]:
    """Our environment with ``root`` last on ``PYTHONPATH``.

    A child started this way outside ``root`` still imports ``root``'s
    packages unless its command line sets ``PYTHONPATH`` itself.
    """
    env = dict(os.environ)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([*paths, root])
    return env


def _open_log(path: str) -> IO[bytes]:
    return open(path, "wb")


async def start_child(
    name: str,
    argv: list[str],
    log_path: str,
    *,
    capture_stdout: bool = False,
    cwd: str | None = None,
    env: dict[str, str] | None = None,
) -> Child:
    """Start ``argv`` with stderr (and stdout unless captured) to ``log_path``.

    ``cwd`` and ``env`` default to ours.

    Raises:
        UpstreamFailed: the program could not be started.
    """
    log_file = _open_log(log_path)
    try:
        process = await trio.lowlevel.open_process(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if capture_stdout else log_file,
            stderr=log_file,
            start_new_session=True,
            cwd=cwd,
            env=env,
        )
    except OSError as exc:
        log_file.close()
        raise UpstreamFailed(f"cannot start {name} ({argv[0]}): {exc}") from exc
    return Child(name, process, log_path, log_file)


async def wait_listening(child: Child, timeout_s: float = START_TIMEOUT_S) -> str:
    """Read the child's stdout until ``listening on <url>``; return the URL.

    Raises:
        UpstreamFailed: the child exited or stayed silent past ``timeout_s``.
    """
    stdout = child.process.stdout
    if stdout is None:
        raise UpstreamFailed(f"{child.name}: stdout is not captured")
    seen = bytearray()
    with trio.move_on_after(timeout_s):
        while True:
            data = await stdout.receive_some(4096)
            if not data:
                break
            seen += data
            match = _LISTENING_RE.search(seen)
            if match:
                return match.group(1).decode("ascii")
    raise UpstreamFailed(
        f"{child.name} did not report 'listening on' within {timeout_s:g} s;"
        f" output:\n{bytes(seen).decode('utf-8', 'replace')}{child.log_tail()}"
    )


async def wait_port(child: Child, host: str, port: int, timeout_s: float = START_TIMEOUT_S) -> None:
    """Wait until ``host:port`` accepts TCP connections.

    Raises:
        UpstreamFailed: the child exited, or the port stayed closed past ``timeout_s``.
    """
    with trio.move_on_after(timeout_s):
        while True:
            if child.process.poll() is not None:
                raise UpstreamFailed(
                    f"{child.name} exited with status {child.process.returncode}:\n"
                    + child.log_tail()
                )
            try:
                stream = await trio.open_tcp_stream(host, port)
            except OSError:
                await trio.sleep(0.05)
                continue
            await trio.aclose_forcefully(stream)
            return
    raise UpstreamFailed(
        f"{child.name} did not listen on {host}:{port} within {timeout_s:g} s:\n" + child.log_tail()
    )


async def stop_child(child: Child) -> None:
    """SIGTERM, wait up to :data:`STOP_GRACE_S`, then SIGKILL; shielded, never raises."""
    process = child.process
    with trio.CancelScope(shield=True):
        try:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGTERM)
                with trio.move_on_after(STOP_GRACE_S):
                    await process.wait()
                if process.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        process.kill()
                    with trio.move_on_after(STOP_GRACE_S):
                        await process.wait()
        finally:
            if process.stdout is not None:
                await trio.aclose_forcefully(process.stdout)
            child.log_file.close()


# --- /proc ------------------------------------------------------------------


def _ticks_per_second() -> int:
    try:
        return os.sysconf("SC_CLK_TCK")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not Linux
        return 100


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of ``/proc/<pid>/stat`` after the command name (field 3 first)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            text = stat.read().decode("latin-1")
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()  # the name may hold spaces or ')'


def process_tree(pid: int) -> list[int]:
    """``pid`` and its live descendants (from the parent ids in ``/proc/*/stat``)."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:  # pragma: no cover - no /proc
        return [pid]
    for entry in entries:
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, ()))
    return tree


def _process_clock(pid: int) -> int:
    """Linux's CPU-time clock id of process ``pid`` (``MAKE_PROCESS_CPUCLOCK(pid, SCHED)``).

    This is what glibc's ``clock_getcpuclockid`` returns: ``(~pid << 3) | 2``.
    """
    return ((~pid) << 3) | _CPUCLOCK_SCHED


def process_cpu_seconds(pid: int) -> float | None:
    """CPU seconds (user + system) of one process; None if it is gone.

    Read from the process's CPU-time clock (nanosecond resolution), else from
    ``utime + stime`` of ``/proc/<pid>/stat`` (clock-tick resolution).
    """
    try:
        return time.clock_gettime(_process_clock(pid))
    except (OSError, OverflowError, AttributeError):
        pass
    fields = _stat_fields(pid)
    if fields is None:
        return None
    return (int(fields[11]) + int(fields[12])) / _ticks_per_second()  # utime 14, stime 15


def cpu_seconds(pid: int) -> float | None:
    """CPU seconds of ``pid`` and its live descendants; None if ``pid`` is gone."""
    own = process_cpu_seconds(pid)
    if own is None:
        return None
    others = (process_cpu_seconds(member) for member in process_tree(pid)[1:])
    return own + sum(value for value in others if value is not None)


def _run_delay_ns(pid: int) -> int | None:
    """Nanoseconds the threads of one process spent runnable, waiting for a CPU.

    The second field of ``/proc/<pid>/task/<tid>/schedstat`` (``run_delay``),
    summed over the threads; None if the process is gone or the kernel keeps
    no scheduler statistics.
    """
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    total, found = 0, False
    for tid in threads:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as stat:
                total += int(stat.read().split()[1])
                found = True
        except (OSError, IndexError, ValueError):
            continue
    return total if found else None


def run_queue_seconds(pid: int) -> float | None:
    """Seconds ``pid`` and its live descendants spent runnable but not running.

    What CPU time does not show: a process that had work and waited for a
    core (the machine's other processes had them). With :func:`cpu_seconds`
    it splits a run's wall time into on a CPU, waiting for one, and asleep
    (nothing to do: every socket empty). None if ``pid`` is gone or the
    kernel has no ``schedstat``.
    """
    delays = [_run_delay_ns(member) for member in process_tree(pid)]
    if delays[0] is None:
        return None
    return sum(value for value in delays if value is not None) / 1e9


def rss_kib(pid: int) -> int | None:
    """Resident set size (``VmRSS``, KiB) of ``pid`` and its descendants; None if gone."""
    total = 0
    found = False
    for member in process_tree(pid):
        try:
            with open(f"/proc/{member}/status", "rb") as status:
                for line in status:
                    if line.startswith(b"VmRSS:"):
                        total += int(line.split()[1])
                        found = True
                        break
        except OSError:
            continue
    return total if found else None


def own_cpu_seconds() -> float:
    """CPU seconds (user + system) used by this process so far (all its threads)."""
    return time.process_time()


def own_run_queue_seconds() -> float | None:
    """:func:`run_queue_seconds` of this process (all its threads)."""
    return run_queue_seconds(os.getpid())
