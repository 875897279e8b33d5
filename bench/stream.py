"""``python -m bench stream``: measure any OpenAI-compatible streaming endpoint.

Theory of operation
-------------------
``--concurrency N`` workers each run streams one after another until
``--requests M`` streams have been started in total, or until
``--duration S`` has passed (then no new stream starts; those in flight
finish). Every stream is bounded by ``--timeout``, so the whole run is
bounded too. Each stream is one POST ``{base}/chat/completions`` with
``"stream": true`` (:mod:`bench.runners`), checked by
:class:`~bench.readers.OpenAIStreamReader`: a stream that ends without
``[DONE]``, carries an in-band error or is cut off is an error, never a fast
success, and its timings are left out of the latency figures.

Figures (what llmperf and vLLM's ``benchmark_serving`` report), each as
p50/p90/p99/max over the successful streams (:func:`summarize_run`):

- time to first token: request start (before connecting) to the first
  chunk with answer text (``content`` or ``reasoning_content``);
- inter-chunk latency: gaps between consecutive such chunks, all streams
  pooled;
- chunks/s and characters/s per stream, over the stream's total time;
- total time per stream;

and in aggregate: chunks, characters and successful requests per second of
wall-clock time, and errors by kind.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

import trio

from bench.progress import NoProgress, Progress
from bench.readers import StreamRecord
from bench.runners import chat_body, request_headers, run_openai_stream
from bench.stats import gaps, summarize
from bench.wire import Endpoint
from protocol.errors import RequestError

if TYPE_CHECKING:
    import ssl

DEFAULT_PROMPT = "Write a short story about a lighthouse keeper, in about 200 words."
#: When neither ``--requests`` nor ``--duration`` is given.
DEFAULT_REQUESTS = 20


@dataclass(frozen=True, slots=True)
class StreamOptions:
    """What ``bench stream`` was asked to do (see ``--help``)."""

    base_url: str = "http://127.0.0.1:8000/v1"
    api_key: str | None = None
    model: str = "step"
    prompt: str = DEFAULT_PROMPT
    concurrency: int = 1
    requests: int | None = None
    duration_s: float | None = None
    timeout_s: float = 120.0
    max_tokens: int | None = None

    def check(self) -> None:
        """Refuse options that would make an unbounded or empty run.

        Raises:
            RequestError: naming the option.
        """
        Endpoint.parse(self.base_url)
        if self.concurrency < 1:
            raise RequestError("--concurrency must be at least 1", param="concurrency")
        if self.requests is not None and self.duration_s is not None:
            raise RequestError("give --requests or --duration, not both", param="requests")
        if self.requests is not None and self.requests < 1:
            raise RequestError("--requests must be at least 1", param="requests")
        if self.duration_s is not None and not self.duration_s > 0:
            raise RequestError("--duration must be positive", param="duration")
        if not self.timeout_s > 0:
            raise RequestError("--timeout must be positive", param="timeout")


@dataclass(slots=True)
class StreamRun:
    """The records of one run, in start order, and its wall-clock span."""

    records: list[StreamRecord]
    start_ns: int
    wall_s: float


async def run_streams(
    options: StreamOptions,
    progress: Progress | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> StreamRun:
    """Run the benchmark.

    Raises:
        RequestError: bad options (see :meth:`StreamOptions.check`).
    """
    options.check()
    progress = progress or NoProgress()
    endpoint = Endpoint.parse(options.base_url)
    extra = {"max_tokens": options.max_tokens} if options.max_tokens else None
    body = chat_body(options.model, options.prompt, extra)
    headers = request_headers(options.api_key)
    requests = options.requests
    if requests is None and options.duration_s is None:
        requests = DEFAULT_REQUESTS
    records: list[StreamRecord] = []
    counter = itertools.count()
    start = trio.current_time()
    deadline = start + options.duration_s if options.duration_s is not None else None

    async def worker() -> None:
        while True:
            if requests is not None and next(counter) >= requests:
                return
            if deadline is not None and trio.current_time() >= deadline:
                return
            record = StreamRecord()
            records.append(record)
            await run_openai_stream(
                endpoint,
                body,
                headers,
                record,
                timeout_s=options.timeout_s,
                ssl_context=ssl_context,
            )
            progress.advance()

    workers = options.concurrency if requests is None else min(options.concurrency, requests)
    start_ns = time.monotonic_ns()
    progress.begin(f"streaming from {endpoint.base_url}", requests or 0)
    try:
        async with trio.open_nursery() as nursery:
            for _ in range(workers):
                nursery.start_soon(worker)
    finally:
        progress.end()
    return StreamRun(records, start_ns, (time.monotonic_ns() - start_ns) / 1e9)


def _per_stream(record: StreamRecord, run_start_ns: int) -> dict[str, Any]:
    end = record.end_ns if record.end_ns is not None else record.start_ns
    return {
        "start_ms": (record.start_ns - run_start_ns) / 1e6,
        "ttft_ms": None if record.first_ns is None else (record.first_ns - record.start_ns) / 1e6,
        "total_s": (end - record.start_ns) / 1e9,
        "chunks": len(record.chunk_ns),
        "chars": record.chars,
        "ok": record.ok,
        "error": record.error,
        "detail": record.detail or None,
    }


def summarize_run(run: StreamRun) -> dict[str, Any]:
    """The figures of a run as a JSON-ready mapping (see the module docstring)."""
    ok = [r for r in run.records if r.ok and r.end_ns is not None]
    ttft: list[float] = []
    inter: list[float] = []
    totals: list[float] = []
    chunk_rates: list[float] = []
    char_rates: list[float] = []
    chunks = chars = 0
    for record in ok:
        assert record.end_ns is not None
        total_s = (record.end_ns - record.start_ns) / 1e9
        totals.append(total_s)
        if record.first_ns is not None:
            ttft.append((record.first_ns - record.start_ns) / 1e6)
        inter.extend(g / 1e6 for g in gaps(record.chunk_ns))
        if total_s > 0:
            chunk_rates.append(len(record.chunk_ns) / total_s)
            char_rates.append(record.chars / total_s)
        chunks += len(record.chunk_ns)
        chars += record.chars
    errors: dict[str, int] = {}
    for record in run.records:
        if record.error is not None:
            errors[record.error] = errors.get(record.error, 0) + 1
    wall = run.wall_s
    return {
        "requests": len(run.records),
        "ok": len(ok),
        "failed": sum(errors.values()),
        "empty_answers": sum(1 for r in ok if not r.chunk_ns),
        "wall_s": wall,
        "figures": {
            "ttft_ms": summarize(ttft).as_dict(),
            "inter_chunk_ms": summarize(inter).as_dict(),
            "stream_chunks_per_s": summarize(chunk_rates).as_dict(),
            "stream_chars_per_s": summarize(char_rates).as_dict(),
            "total_s": summarize(totals).as_dict(),
        },
        "aggregate": {
            "chunks": chunks,
            "chars": chars,
            "chunks_per_s": chunks / wall if wall > 0 else None,
            "chars_per_s": chars / wall if wall > 0 else None,
            "requests_per_s": len(ok) / wall if wall > 0 else None,
        },
        "errors": errors,
        "error_samples": [f"{r.error}: {r.detail}" for r in run.records if r.error is not None][:5],
    }


def report_of(options: StreamOptions, run: StreamRun) -> dict[str, Any]:
    """The whole JSON report: options (API key hidden), summary and per-stream rows."""
    return {
        "tool": "bench stream",
        "options": asdict(replace(options, api_key="***" if options.api_key else None)),
        "summary": summarize_run(run),
        "streams": [_per_stream(r, run.start_ns) for r in run.records],
    }
