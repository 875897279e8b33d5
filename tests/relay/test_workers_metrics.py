"""``GET /metrics`` under ``relay serve --workers 2`` (issue 15): every worker's numbers.

The workers share the port (SO_REUSEPORT), so each request and each scrape
lands on either. prometheus-client's multi-process mode keeps each worker's
metrics in files of a private temporary directory that any worker merges
when scraped; the parent removes the directory once the workers are gone.
The child's TMPDIR is the test's own directory, so what it leaves is seen.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from typing import TYPE_CHECKING

import httpcore
import trio
from prometheus_client.parser import text_string_to_metric_families

from tests.redis_server import free_port
from tests.relay.conftest import AUTH, chat_body, post

if TYPE_CHECKING:
    from pathlib import Path

    from providers.step.emulator import StepEmulator

PROCESS_TIMEOUT_S = 20  # two spawned Python processes: their imports take most of it
WAIT_LIMIT_S = 10.0  # a bound on what takes milliseconds
REQUESTS = 20  # on new connections: both workers get some (all on one: 1 in 2**19)
PATH = "/v1/chat/completions"
#: the names a single process reports (relay/metrics.py), with --workers too
NAMES = {
    "relay_requests", "relay_request_duration_seconds", "relay_active_streams",
    "relay_account_active_streams", "relay_accounts", "relay_accounts_resting",
    "relay_accounts_healthy", "relay_account_waiters", "relay_account_logins",
    "relay_account_refreshes", "relay_open_connections", "relay_requests_in_flight",
    "relay_upstream_connections_active", "relay_upstream_connections_idle",
    "relay_cleanup_pending", "relay_upstream_connections_opened",
}


async def scrape(base_url: str) -> tuple[str, dict[str, dict[tuple[str, ...], float]]]:
    """GET /metrics on a new connection: the text, and name -> labels -> value
    (labels as sorted ``key=value`` strings)."""
    async with httpcore.AsyncConnectionPool() as pool:
        response = await pool.request("GET", base_url + "/metrics")
    assert response.status == 200
    text = response.content.decode()
    values: dict[str, dict[tuple[str, ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = tuple(sorted(f"{k}={v}" for k, v in sample.labels.items()))
            values.setdefault(sample.name, {})[labels] = sample.value
    return text, values


def listing(directory: Path) -> list[Path]:
    """What ``directory`` holds (a few entries: no thread needed)."""
    return sorted(directory.iterdir())


def writers(directory: Path) -> set[str]:
    """The process ids whose gauge files are in ``directory`` (``gauge_<mode>_<pid>.db``)."""
    return {path.stem.rsplit("_", 1)[1] for path in directory.glob("gauge_*.db")}


def chats_counted(values: dict[str, dict[tuple[str, ...], float]]) -> float:
    """relay_requests_total of the chat route, summed over its other labels."""
    return sum(value for labels, value in values.get("relay_requests_total", {}).items()
               if f"route={PATH}" in labels)


async def test_metrics_sum_over_workers_and_their_directory_is_removed(
    step: StepEmulator, nursery: trio.Nursery, tmp_path: Path
) -> None:
    """Twenty chats on new connections, then every scrape (whichever worker answers it)
    counts all twenty, with the names one process reports; both workers write to one
    temporary directory, which is gone when the parent has exited."""
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("RELAY_", "PROMETHEUS_"))}
    env.update(TMPDIR=str(tmp_path), RELAY_LOG_LEVEL="info", RELAY_GRACE_PERIOD="1")
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "relay", "serve", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "2", "--step-base-url", step.base_url],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
    )
    assert process.stderr is not None
    stderr = bytearray()
    listening = re.compile(rb"(listening on http://127\.0\.0\.1:%d\n.*){2}" % port, re.S)
    heard = trio.Event()

    async def read_stderr() -> None:  # drained all along: the pipe never fills
        assert process.stderr is not None
        while chunk := await process.stderr.receive_some(65536):
            stderr.extend(chunk)
            if listening.search(stderr):
                heard.set()
        heard.set()

    nursery.start_soon(read_stderr)
    try:
        with trio.fail_after(PROCESS_TIMEOUT_S):
            await heard.wait()
        assert listening.search(stderr), f"relay exited early:\n{stderr.decode(errors='replace')}"
        (directory,) = listing(tmp_path)
        assert directory.name.startswith("relay-metrics-")

        with trio.fail_after(WAIT_LIMIT_S):
            # both workers write there (their gauges, from their first refresh on)
            while True:  # files of another process: no event of ours says they are there
                if len(writers(directory)) == 2:
                    break
                await trio.sleep(0.01)
            for _ in range(REQUESTS):
                assert (await post(base_url, PATH, chat_body(), AUTH)).status == 200
            # a request is counted as it leaves the worker (its client may be faster), and
            # a worker's account snapshot reaches the files within a second
            _, values = await scrape(base_url)
            while (chats_counted(values) < REQUESTS
                   or values.get("relay_accounts", {}).get(("provider=step",)) != 1):
                await trio.sleep(0.01)
                _, values = await scrape(base_url)
            for _ in range(8):  # each on a new connection: both workers answer some
                text, values = await scrape(base_url)
                assert chats_counted(values) == REQUESTS
                assert "_created" not in text
                names = {family.name for family in text_string_to_metric_families(text)}
                assert names >= NAMES
                # the workers know the same one client account: the largest view, not a sum
                assert values["relay_accounts"][("provider=step",)] == 1
                assert values["relay_account_logins_total"][("provider=step",)] >= 1
                assert values["relay_requests_in_flight"][()] >= 1  # this scrape
            process.send_signal(signal.SIGTERM)
            assert await process.wait() == 0, stderr.decode(errors="replace")
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:  # the parent forwards SIGTERM to its workers
                process.terminate()
                with trio.move_on_after(WAIT_LIMIT_S):
                    await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()
    assert listing(tmp_path) == []
    assert b"Traceback" not in stderr
