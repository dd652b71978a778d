"""A replica's generations all run on its one engine thread, whichever thread asked (osd/serving/engine_thread.py)."""

from __future__ import annotations

import threading

import pytest
from support.tiny import tiny_engine

from osd.serving.core import ServingCore
from osd.serving.engine_thread import EngineThread


def test_every_generation_runs_on_the_engine_thread_and_errors_come_back():
    core = ServingCore(tiny_engine(noise=0.3, gamma=2), "tiny")
    seen, generate = [], core.engine.generate

    def spy(*args, **kwargs):
        seen.append(threading.current_thread().name)
        return generate(*args, **kwargs)

    core.engine.generate = spy
    callers = [threading.Thread(target=core.complete, args=({"prompt": [1, 2, 3], "max_tokens": 4},)) for _ in range(3)]
    for t in callers:
        t.start()
    for t in callers:
        t.join()
    core.complete({"prompt": [4, 5], "max_tokens": 4})
    stream = "".join(core.stream_complete({"prompt": [6, 7], "max_tokens": 4, "stream": True}))
    assert "[DONE]" in stream
    assert len(seen) == 5 and len(set(seen)) == 1 and seen[0].startswith("osd-engine")


def test_engine_thread_raises_the_callables_error_in_the_caller():
    thread = EngineThread()
    assert thread.run(lambda a, b=0: a + b, 2, b=3) == 5
    with pytest.raises(ZeroDivisionError):
        thread.run(lambda: 1 / 0)
    thread.close()
