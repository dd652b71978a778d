"""Streaming: a request's tokens as OpenAI Server-Sent Events, generated on a worker thread.

Streamed text is always a prefix of the final text (``StreamText``), and a client that
goes away stops the engine at its next round (``SSEStream.close``).
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from osd.config import SamplingParams
from osd.decoding.engine import Generation
from osd.serving.api import Delta, ServingError, Usage, error_body

if TYPE_CHECKING:  # the core hands itself to each stream; importing it here would be circular
    from osd.serving.core import ServingCore

log = logging.getLogger(__name__)


class Cancelled(Exception):
    """The client went away: stop generating (raised from the engine's on_tokens callback)."""


@dataclass
class PreparedRequest:
    """A validated request, ready to generate."""

    chat: bool
    request_id: str
    created: int
    prompt_ids: list[int]
    params: SamplingParams
    cluster: str
    include_usage: bool


class StreamText:
    """Turns streamed token ids into text deltas that are always a prefix of the final text.

    The engine may run up to one round past EOS or a stop string, and a byte-level BPE
    may end mid-character, so: ids after the first EOS (or past max_tokens) are ignored,
    no text at or after a stop string is sent, a tail that could be the start of a stop
    string is held back, and so is a trailing U+FFFD (an incomplete UTF-8 sequence).
    """

    def __init__(self, tokenizer, eos_ids: set[int], params: SamplingParams) -> None:
        self.tokenizer, self.eos_ids, self.params = tokenizer, eos_ids, params
        self.ids: list[int] = []
        self.sent = ""
        self.done = False

    def add(self, new_ids: list[int]) -> str:
        if self.done:
            return ""
        for t in new_ids:
            if len(self.ids) >= self.params.max_tokens:
                self.done = True
                break
            self.ids.append(t)
            if t in self.eos_ids:
                self.done = True
                break
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        safe = text[: self._safe_length(text)]
        if not safe.startswith(self.sent):  # decode was not prefix-stable here: let the final text settle it
            return ""
        delta, self.sent = safe[len(self.sent):], safe
        return delta

    def _safe_length(self, text: str) -> int:
        cut = len(text)
        for s in self.params.stop:
            if (i := text.find(s)) >= 0:
                cut, self.done = min(cut, i), True
        hold = 0
        for s in self.params.stop:
            hold = max(hold, next((k for k in range(min(len(s) - 1, cut), 0, -1) if text[:cut].endswith(s[:k])), 0))
        cut -= hold
        while cut > 0 and text[cut - 1] == "\ufffd":
            cut -= 1
        return cut

    def finish(self, final_text: str) -> str:
        """The rest of the final (non-streamed) text after what was sent."""
        if not final_text.startswith(self.sent):
            log.warning("streamed text diverged from the final text (tokenizer decode is not prefix-stable); "
                        "the stream's concatenation may differ from the non-streamed response")
            return ""
        return final_text[len(self.sent):]


def _sse(payload: str) -> str:
    return f"data: {payload}\n\n"


SSE_DONE = _sse("[DONE]")


class SSEStream:
    """Iterator of Server-Sent-Event strings for one request, ending with ``data: [DONE]``.

    Generation starts on the first ``next()`` in a worker thread, which feeds each round's
    tokens through a queue. ``close()`` may be called from any thread (e.g. the event loop
    when the client disconnects): it ends iteration and makes the engine stop at its next
    round, so the generation lock is not held for an absent client.
    """

    def __init__(self, core: ServingCore, prep: PreparedRequest) -> None:
        self._core, self._prep = core, prep
        self._events: queue.Queue = queue.Queue()
        self._cancel = threading.Event()
        self._lines = self._generate_lines()
        self._thread: threading.Thread | None = None

    def __iter__(self) -> SSEStream:
        return self

    def __next__(self) -> str:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="osd-stream", daemon=True)
            self._thread.start()
        return next(self._lines)

    def close(self) -> None:
        self._cancel.set()
        self._events.put(("cancelled", None))

    def _work(self) -> None:
        def on_tokens(ids: list[int]) -> None:
            if self._cancel.is_set():
                raise Cancelled
            self._events.put(("tokens", list(ids)))

        try:
            self._events.put(("done", self._core.generate_prepared(self._prep, on_tokens, self._cancel)))
        except Cancelled:
            self._events.put(("cancelled", None))
        except ServingError as e:
            self._events.put(("error", e))
        except Exception as e:  # the 200 is already sent: report in-band, keep serving
            log.exception("streamed request %s failed", self._prep.request_id)
            self._core.metrics.observe_error(500)
            self._events.put(("error", e))

    def _generate_lines(self) -> Iterator[str]:
        core, prep = self._core, self._prep
        text = StreamText(core.tokenizer, core.engine.eos_ids, prep.params)
        if prep.chat:
            yield _sse(core.chunk(prep, Delta(role="assistant", content="")).model_dump_json())
        while True:
            kind, payload = self._events.get()
            if kind == "tokens":
                if delta := text.add(payload):
                    yield _sse(core.chunk(prep, delta).model_dump_json())
            elif kind == "done":
                gen, cluster, live = payload
                tail = text.finish(gen.text)
                yield _sse(core.chunk(prep, tail, gen.finish_reason, core.osd_stats(gen, cluster, live))
                           .model_dump_json())
                if prep.include_usage:
                    yield _sse(core.chunk(prep, None, usage=usage_of(gen)).model_dump_json())
                yield SSE_DONE
                return
            elif kind == "error":
                status = payload.status if isinstance(payload, ServingError) else 500
                message = payload.message if isinstance(payload, ServingError) else (
                    f"generation failed ({type(payload).__name__}); see the replica log")
                yield _sse(_json(error_body(message, "server_error" if status >= 500 else "invalid_request_error")))
                yield SSE_DONE
                return
            else:  # cancelled
                return


def _json(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


def usage_of(gen: Generation) -> Usage:
    prompt, completion = gen.stats.prompt_tokens, len(gen.output_ids)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)
