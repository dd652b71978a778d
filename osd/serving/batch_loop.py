"""Continuous batching in a serving replica: one loop on the engine thread feeds a BatchEngine.

Callers (the HTTP layer's worker threads) ``submit`` a request and wait on the returned future. The loop runs on
the replica's engine thread (osd/serving/engine_thread.py) while there is work: between rounds it runs queued
one-off calls (``call``: requests the batch cannot serve, e.g. log-probs or prompt scoring), drops requests whose
cancel flag is set (a streaming client that went away: its slot frees at once), admits queued requests while the
batch has room, then runs one ``BatchEngine.step``. Streamed tokens go to each request's ``on_tokens``; finished
requests resolve their futures with their Generation. When nothing is queued or active the loop returns and the
engine thread waits on its own queue; the next ``submit`` starts it again.

A request's failures stay its own: a rejected ``add`` (RequestError), an ``on_tokens`` that raises (the stream's
Cancelled) fail that request's future only. A failing ``step`` fails every active request (the batch's state is
unknown after it) and the loop goes on with the queue.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from osd.decoding.batch_engine import BatchEngine
from osd.decoding.engine import Generation
from osd.serving.engine_thread import EngineThread
from osd.serving.streaming import Cancelled

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Job:
    kwargs: dict  # BatchEngine.add's arguments, on_tokens excepted
    on_tokens: Callable[[list[int]], None] | None
    cancel: threading.Event | None
    resolve: Callable[[], dict] | None = None  # more add() arguments, read at admission (the live draft)
    future: Future = field(default_factory=Future)
    error: BaseException | None = None  # what its on_tokens raised: the request ends with it after this round
    rid: str | None = None


class BatchLoop:
    """Feeds a BatchEngine from many threads; its rounds run on ``engine_thread``. See the module docstring.
    A request whose cancel flag is set ends with streaming's Cancelled."""

    def __init__(self, batch: BatchEngine, engine_thread: EngineThread) -> None:
        self.batch = batch
        self.engine_thread = engine_thread
        self._lock = threading.Lock()
        self._queue: deque[_Job] = deque()
        self._calls: deque[tuple[Future, Callable[..., Any], tuple, dict]] = deque()
        self._active: dict[str, _Job] = {}  # only the loop touches it
        self._running = False  # a loop is scheduled or running on the engine thread

    # -- any thread ---------------------------------------------------------------------------------

    def submit(self, on_tokens: Callable[[list[int]], None] | None = None, cancel: threading.Event | None = None,
               resolve: Callable[[], dict] | None = None, **add_kwargs) -> Future[Generation]:
        """Queue a request (add_kwargs: BatchEngine.add's prompt_ids, params, draft, draft_version, cluster,
        request_id; ``resolve()``: more of them, called when the request joins the batch, e.g. the live draft
        then); the future resolves with its Generation or raises what failed it."""
        job = _Job(add_kwargs, on_tokens, cancel, resolve)
        self._enqueue(self._queue, job)
        return job.future

    def call(self, fn: Callable[..., Any], *args, **kwargs) -> Future:
        """fn(*args, **kwargs) on the engine thread between two rounds (the batch waits for it)."""
        future: Future = Future()
        self._enqueue(self._calls, (future, fn, args, kwargs))
        return future

    @property
    def waiting(self) -> int:
        return len(self._queue)

    @property
    def running(self) -> int:
        return len(self._active)

    def _enqueue(self, queue: deque, item: Any) -> None:
        with self._lock:
            queue.append(item)
            if self._running:
                return
            self._running = True
        self.engine_thread.submit(self._run)

    # -- the engine thread --------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                with self._lock:
                    if not (self._queue or self._calls or self._active):
                        self._running = False
                        return
                self._run_calls()
                self._drop_cancelled()
                self._admit()
                if self._active:
                    self._step()
        except BaseException:  # a bug here: never leave callers waiting on a loop that is gone
            log.exception("batch loop failed")
            with self._lock:
                self._running = False
            self._fail_all(RuntimeError("the batch loop failed; see the replica log"))
            raise

    def _run_calls(self) -> None:
        while True:
            with self._lock:
                if not self._calls:
                    return
                future, fn, args, kwargs = self._calls.popleft()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args, **kwargs))
                except BaseException as e:
                    future.set_exception(e)

    def _drop_cancelled(self) -> None:
        for rid, job in list(self._active.items()):
            if job.error is not None or (job.cancel is not None and job.cancel.is_set()):
                self.batch.cancel(rid)
                del self._active[rid]
                job.future.set_exception(job.error or Cancelled())

    def _admit(self) -> None:
        while self.batch.has_room:
            with self._lock:
                if not self._queue:
                    return
                job = self._queue.popleft()
            if job.cancel is not None and job.cancel.is_set():
                job.future.set_exception(Cancelled())
                continue
            try:
                kwargs = job.kwargs | (job.resolve() if job.resolve is not None else {})
                job.rid = self.batch.add(**kwargs, on_tokens=self._deliver(job))
            except Exception as e:  # a bad request fails alone
                job.future.set_exception(e)
                continue
            self._active[job.rid] = job

    def _deliver(self, job: _Job) -> Callable[[list[int]], None] | None:
        """The request's on_tokens, made unable to break the round: what it raises ends the request afterwards."""
        if job.on_tokens is None:
            return None

        def on_tokens(ids: list[int]) -> None:
            if job.error is not None:
                return
            try:
                job.on_tokens(ids)
            except Exception as e:
                job.error = e

        return on_tokens

    def _step(self) -> None:
        try:
            out = self.batch.step()
        except Exception as e:
            log.exception("batched round failed; failing its %d requests", len(self._active))
            for rid, job in list(self._active.items()):
                try:
                    self.batch.cancel(rid)
                except Exception:
                    log.exception("could not drop request %s from the batch", rid)
                job.future.set_exception(e)
            self._active.clear()
            return
        for rid, gen in out.finished.items():
            job = self._active.pop(rid)
            if job.error is not None:
                job.future.set_exception(job.error)
            else:
                job.future.set_result(gen)

    def _fail_all(self, error: BaseException) -> None:
        for rid, job in list(self._active.items()):
            try:
                self.batch.cancel(rid)
            except Exception:
                log.exception("could not drop request %s from the batch", rid)
            if not job.future.done():
                job.future.set_exception(error)
        self._active.clear()
        with self._lock:
            jobs, self._queue = list(self._queue), deque()
            calls, self._calls = list(self._calls), deque()
        for job in jobs:
            job.future.set_exception(error)
        for future, *_ in calls:
            if not future.done():
                future.set_exception(error)
