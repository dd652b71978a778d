"""The one thread a replica runs its torch work on.

torch's CPU kernels parallelise with OpenMP, whose thread teams belong to the thread that starts
a parallel region. A replica loaded and warmed its models on one thread and then ran each request
on whichever worker thread the HTTP layer handed it, so several teams competed for the same cores.
Measured on 2 cores (bf16 SmolLM2, 2 torch threads, greedy, 48 tokens): 21-23 tok/s with loading
and requests all on one thread; 15-19 tok/s when requests ran on another thread (fresh or the same
one each time); and through the Ray Serve endpoint, 0.71-0.77x the engine in-process (`osd bench
overhead`). So the replica loads, warms up and generates on this one thread.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


class EngineThread:
    """Runs callables one at a time on a single long-lived thread; the caller waits for the result."""

    def __init__(self, name: str = "osd-engine") -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    def run(self, fn: Callable[..., T], *args, **kwargs) -> T:
        """fn(*args, **kwargs) on the engine thread; its exception is raised here."""
        return self._pool.submit(fn, *args, **kwargs).result()

    def submit(self, fn: Callable[..., T], *args, **kwargs) -> Future[T]:
        """fn(*args, **kwargs) on the engine thread, without waiting (a BatchLoop's rounds run this way)."""
        return self._pool.submit(fn, *args, **kwargs)

    def close(self) -> None:
        self._pool.shutdown(wait=False)
