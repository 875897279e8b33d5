"""The files of one request, as both providers fetch and upload them (PROTOCOLS.md 1.4).

The references fetch every file of a request at once and hold each whole in
memory until it is uploaded, so a request naming thirty 100 MiB files could
make the relay hold 3 GiB. Here the memory one request can take is bounded
three ways, none of them by the number of parts:

- how many files a request may name at all (``max_files``) is checked when
  the request is parsed, before anything is fetched (``relay/routes.py``);
- all files of a request together draw on one byte budget
  (``files_max_bytes``), counted as the bytes arrive (the relay's
  :class:`~providers.contract.FileBatch`);
- at most :data:`FILES_AT_ONCE` files are between "fetch started" and
  "upload done" at any time (a :class:`trio.CapacityLimiter` per request):
  a file's bytes are dropped when its upload returns, before the next fetch
  begins.

The first failure cancels the rest and is raised as itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

import trio

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence

    from providers.contract import FetchedFile, Fetcher

T = TypeVar("T")

#: files of one request fetched and uploaded at the same time
FILES_AT_ONCE = 3


async def gather(*calls: Callable[[], Awaitable[T]]) -> list[T]:
    """Run ``calls`` concurrently; return their results in order.

    The first failure cancels the rest and is raised as itself (not wrapped
    in an ExceptionGroup), so callers can map it to a status.
    """
    results: list[T | None] = [None] * len(calls)
    failure: list[BaseException] = []

    async def run(i: int, call: Callable[[], Awaitable[T]], nursery: trio.Nursery) -> None:
        try:
            results[i] = await call()
        except Exception as exc:
            if not failure:
                failure.append(exc)
            nursery.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        for i, call in enumerate(calls):
            nursery.start_soon(run, i, call, nursery)
    if failure:
        raise failure[0]
    return [r for r in results if r is not None]


async def each_file(
    fetcher: Fetcher,
    urls: Sequence[str],
    use: Callable[[int, FetchedFile], Awaitable[T]],
    *,
    at_once: int = FILES_AT_ONCE,
) -> list[T]:
    """Fetch the files at ``urls`` as one request's, and hand each to ``use``.

    Args:
        fetcher: the relay's fetcher; one batch (one byte budget) is taken from it.
        urls: http(s) or data URLs, in order.
        use: called with the index of the URL and its file (an upload,
            usually); the file is not kept after it returns.
        at_once: files between fetch and the end of ``use`` at the same time.

    Returns:
        What ``use`` returned, in the order of ``urls``.

    Raises:
        RequestError: a file could not be fetched, or the files are over a
            limit; whatever ``use`` raised. The first failure cancels the rest.
    """
    if not urls:
        return []
    batch = fetcher.batch()
    limiter = trio.CapacityLimiter(at_once)

    async def one(index: int) -> T:
        async with limiter:
            return await use(index, await batch.fetch(urls[index]))

    return await gather(*[lambda i=i: one(i) for i in range(len(urls))])
