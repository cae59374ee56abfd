"""Serve concurrent requests in batches: a queue, one decoding task, and batch boundaries.

verl's agent loop sends one ``generate`` call per sample, concurrently. A model forward over a
batch of rows costs little more than over one row on a CPU, so :class:`RequestBatcher` queues the
calls and runs them through a batch function, one batch at a time:

* a batch holds queued requests that share a batch key (e.g. the same sampling distribution),
  in arrival order, at most ``max_batch_size`` of them; others wait for a later batch;
* the batch function runs in a worker thread, so the event loop keeps accepting requests and
  control calls while the model runs;
* :meth:`RequestBatcher.exclusive` waits for the running batch and keeps the next one from
  starting: a weight update inside it takes effect at a batch boundary, never inside a batch;
* :meth:`RequestBatcher.abort` answers queued requests with :class:`RequestAborted` and asks the
  running batch to stop early.

:class:`BurstGatherer` is the client-side counterpart, for coroutines: calls made in one burst become
one call of an async batch function (one Ray call instead of one per sample); batches may overlap and
nothing runs in a thread.
"""

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Generic, Optional, TypeVar

Request = TypeVar("Request")
Result = TypeVar("Result")

# How long the first queued request waits for others before its batch starts: requests sent in a
# burst then share one batch instead of the first running alone. A longer wait only adds latency
# when requests trickle in, as verl's agent loop sends them on a small CPU machine (the toy task's
# 64 requests of a step arrive over about a second on 2 cores, in batches of 1-20).
GATHER_WINDOW_S = 0.005

# The batch function receives the queued requests and a callable that turns true once the batch
# should stop (abort); it returns one result per request, in order.
BatchFunction = Callable[[list[Request], Callable[[], bool]], list[Result]]


class RequestAborted(Exception):
    """The request was still queued when :meth:`RequestBatcher.abort` was called."""


@dataclass
class _Queued(Generic[Request, Result]):
    request: Request
    result: "asyncio.Future[Result]"


class RequestBatcher(Generic[Request, Result]):
    """Queue of requests served in batches by one asyncio task (started by the first request).

    Args:
        run_batch: decodes a batch (see :data:`BatchFunction`); an exception it raises is raised by
            every :meth:`submit` call of that batch.
        batch_key: requests with equal keys may share a batch.
        max_batch_size: most requests in one batch (bounds the memory of a batch).
    """

    def __init__(
        self,
        run_batch: BatchFunction,
        batch_key: Callable[[Request], Hashable],
        max_batch_size: int,
    ):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size={max_batch_size}: a batch needs at least one request")
        self._run_batch = run_batch
        self._batch_key = batch_key
        self.max_batch_size = max_batch_size
        self._queue: list[_Queued] = []
        self._queue_filled = asyncio.Event()
        # held while a batch runs and by exclusive(): the boundary between batches
        self._batch_lock = asyncio.Lock()
        # abort() bumps the generation; a batch stops once the generation it started in is over
        self._generation = 0
        self._server: Optional[asyncio.Task] = None

    async def submit(self, request: Request) -> Result:
        """Queue ``request`` and return its result once its batch is done (or raise :class:`RequestAborted`)."""
        queued = _Queued(request, asyncio.get_running_loop().create_future())
        self._queue.append(queued)
        self._queue_filled.set()
        if self._server is None or self._server.done():
            self._server = asyncio.create_task(self._serve())
        return await queued.result

    @asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        """No batch runs inside this block: waits for the running one, holds back the next one."""
        async with self._batch_lock:
            yield

    async def abort(self) -> None:
        """Fail queued requests with :class:`RequestAborted`, stop the running batch and wait for it.

        The running batch's requests get whatever their batch function returns once it notices.
        """
        self._generation += 1
        queued, self._queue = self._queue, []
        for item in queued:
            if not item.result.done():
                item.result.set_exception(RequestAborted())
        async with self._batch_lock:
            pass

    async def _serve(self) -> None:
        while True:
            if not self._queue:
                self._queue_filled.clear()
                await self._queue_filled.wait()
            await asyncio.sleep(GATHER_WINDOW_S)
            async with self._batch_lock:
                batch = self._take_batch()
                if batch:
                    await self._run(batch)

    def _take_batch(self) -> list[_Queued]:
        """Remove and return the oldest queued request with the compatible ones queued after it."""
        waiting = [item for item in self._queue if not item.result.done()]  # done: the caller gave up
        if not waiting:
            self._queue = []
            return []
        key = self._batch_key(waiting[0].request)
        batch, rest = [], []
        for item in waiting:
            joins = len(batch) < self.max_batch_size and self._batch_key(item.request) == key
            (batch if joins else rest).append(item)
        self._queue = rest
        return batch

    async def _run(self, batch: list[_Queued]) -> None:
        generation = self._generation
        try:
            results = await asyncio.to_thread(
                self._run_batch, [item.request for item in batch], lambda: generation != self._generation
            )
            for item, result in zip(batch, results, strict=True):
                if not item.result.done():
                    item.result.set_result(result)
        except Exception as error:
            for item in batch:
                if not item.result.done():
                    item.result.set_exception(error)


# How long the first call of a burst waits for the others. The samples of a chunk reach each call
# site in the same turn of the event loop, so this only has to cover a few scheduling hops.
BURST_WINDOW_S = 0.002


class BurstGatherer(Generic[Request, Result]):
    """Calls made close together are served by one ``run_batch(items) -> results`` call, in order.

    An exception raised by ``run_batch`` is raised by every call of that batch.
    """

    def __init__(self, run_batch: Callable[[list[Request]], Awaitable[list[Result]]]):
        self._run_batch = run_batch
        self._waiting: list[tuple[Request, asyncio.Future]] = []
        # the event loop keeps only weak references to tasks
        self._serving: set[asyncio.Task] = set()

    async def call(self, item: Request) -> Result:
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        if len(self._waiting) == 1:
            task = asyncio.create_task(self._serve_after_window())
            self._serving.add(task)
            task.add_done_callback(self._serving.discard)
        return await future

    async def _serve_after_window(self) -> None:
        await asyncio.sleep(BURST_WINDOW_S)
        batch, self._waiting = self._waiting, []
        try:
            results = await self._run_batch([item for item, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"a batch of {len(batch)} calls got {len(results)} results")
        except BaseException as error:  # every caller must learn of the failure, even a cancellation
            for _, future in batch:
                if not future.done():
                    future.set_exception(error)
            return
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)
