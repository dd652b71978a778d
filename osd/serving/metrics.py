"""Serving metrics: vLLM-style counters and histograms per cluster and draft version, rendered
as Prometheus text for /metrics (and mirrored into Ray's metrics by ``actors.ray_metrics``)."""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)

from osd.decoding.engine import Generation

REQUEST_LABELS = ("cluster", "draft_version")
COUNTERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "osd:request_success": ("Requests finished, by finish reason.", (*REQUEST_LABELS, "finished_reason")),
    "osd:request_errors": ("Requests answered with an error, by HTTP status.", ("status",)),
    "osd:prompt_tokens": ("Prompt tokens processed.", REQUEST_LABELS),
    "osd:generation_tokens": ("Tokens generated.", REQUEST_LABELS),
    "osd:spec_decode_num_drafts": ("Speculative rounds (draft proposals verified by the target).", REQUEST_LABELS),
    "osd:spec_decode_num_draft_tokens": ("Draft tokens proposed.", REQUEST_LABELS),
    "osd:spec_decode_num_accepted_tokens": ("Draft tokens accepted by the target.", REQUEST_LABELS),
    "osd:spec_decode_num_accepted_tokens_per_pos": ("Accepted draft tokens by position in the round (0 = first).",
                                                    (*REQUEST_LABELS, "position")),
    "osd:spec_decode_num_accepted_tokens_by_source": ("Accepted tokens by who proposed them (draft, suffix, both).",
                                                      (*REQUEST_LABELS, "source")),
    "osd:spec_decode_alpha_sum": ("Sum over verified positions of sum_x min(p, q); alpha-hat = rate(sum) / rate(count).",
                                  REQUEST_LABELS),
    "osd:spec_decode_alpha_count": ("Verified positions contributing to alpha_sum.", REQUEST_LABELS),
    "osd:target_forwards": ("Target decode forwards (prefill excluded).", REQUEST_LABELS),
    "osd:draft_swaps": ("Draft swaps on this replica, by outcome (ok / refused / evicted).", ("cluster", "outcome")),
}
# name -> (help, bucket upper bounds); labelled by REQUEST_LABELS. One observation per finished request.
HISTOGRAMS: dict[str, tuple[str, tuple[float, ...]]] = {
    "osd:request_alpha": ("Per-request alpha-hat (mean sum_x min(p, q) over its verified positions).",
                          tuple(i / 10 for i in range(1, 11))),
    "osd:e2e_request_latency_seconds": ("Request latency: waiting for the engine plus generation.",
                                        (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)),
    "osd:request_tokens_per_second": ("Per-request generation speed (output tokens / generation seconds).",
                                      (1, 2, 5, 10, 15, 20, 30, 40, 60, 100, 200, 500)),
}


@dataclass
class _Histogram:
    bounds: tuple[float, ...]
    counts: list[int]  # per bucket (not cumulative); the last is +Inf
    total: float = 0.0

    def observe(self, value: float) -> None:
        self.counts[next((i for i, b in enumerate(self.bounds) if value <= b), len(self.bounds))] += 1
        self.total += value

    def buckets(self) -> list[tuple[str, int]]:
        cumulative, out = 0, []
        for bound, n in zip((*map(str, self.bounds), "+Inf"), self.counts):
            cumulative += n
            out.append((bound, cumulative))
        return out


class MetricsMirror(Protocol):
    """Receives every counter increment and histogram observation too (e.g. Ray metrics)."""

    def add(self, name: str, labels: dict[str, str], value: float) -> None: ...

    def observe(self, name: str, labels: dict[str, str], value: float) -> None: ...


class ServingMetrics:
    """Counters aggregated over requests; ``prometheus_text`` renders them (plus gauges) for /metrics."""

    def __init__(self, mirror: MetricsMirror | None = None) -> None:
        self.mirror = mirror
        self._lock = threading.Lock()
        self._values: dict[str, dict[tuple[str, ...], float]] = defaultdict(lambda: defaultdict(float))
        self._histograms: dict[str, dict[tuple[str, ...], _Histogram]] = defaultdict(dict)

    def _add(self, name: str, labels: tuple[str, ...], value: float) -> None:
        self._values[name][labels] += value
        if self.mirror is not None and value:
            self.mirror.add(name, dict(zip(COUNTERS[name][1], labels)), value)

    def _observe(self, name: str, labels: tuple[str, ...], value: float) -> None:
        bounds = HISTOGRAMS[name][1]
        hist = self._histograms[name].setdefault(labels, _Histogram(bounds, [0] * (len(bounds) + 1)))
        hist.observe(value)
        if self.mirror is not None:
            self.mirror.observe(name, dict(zip(REQUEST_LABELS, labels)), value)

    def observe_request(self, cluster: str, version: int, gen: Generation, latency_s: float) -> None:
        s, key = gen.stats, (cluster, str(version))
        with self._lock:
            if s.alpha_hat is not None:
                self._observe("osd:request_alpha", key, s.alpha_hat)
            self._observe("osd:e2e_request_latency_seconds", key, latency_s)
            if s.elapsed_s > 0:
                self._observe("osd:request_tokens_per_second", key, s.tokens_per_second)
            self._add("osd:request_success", (*key, gen.finish_reason), 1)
            self._add("osd:prompt_tokens", key, s.prompt_tokens)
            self._add("osd:generation_tokens", key, len(gen.output_ids))
            self._add("osd:spec_decode_num_drafts", key, s.rounds)
            self._add("osd:spec_decode_num_draft_tokens", key, s.proposed)
            self._add("osd:spec_decode_num_accepted_tokens", key, s.accepted)
            for pos, n in enumerate(s.accepted_per_position):
                self._add("osd:spec_decode_num_accepted_tokens_per_pos", (*key, str(pos)), n)
            for source, n in s.accepted_by_source().items():
                self._add("osd:spec_decode_num_accepted_tokens_by_source", (*key, source), n)
            self._add("osd:spec_decode_alpha_sum", key, s.beta_sum)
            self._add("osd:spec_decode_alpha_count", key, s.beta_count)
            self._add("osd:target_forwards", key, s.target_forwards)

    def observe_error(self, status: int) -> None:
        with self._lock:
            self._add("osd:request_errors", (str(status),), 1)

    def observe_swap(self, cluster: str, outcome: str) -> None:
        with self._lock:
            self._add("osd:draft_swaps", (cluster, outcome), 1)

    def value(self, name: str, **labels: str) -> float:
        """Sum of a counter over the series matching ``labels`` (for tests and quick checks)."""
        names = COUNTERS[name][1]
        with self._lock:
            return sum(v for k, v in self._values[name].items()
                       if all(k[names.index(n)] == want for n, want in labels.items()))

    def prometheus_text(self, gauges: Mapping[str, tuple[str, Mapping[tuple[tuple[str, str], ...], float]]] = {},
                        counters: Mapping[str, tuple[str, Mapping[tuple[tuple[str, str], ...], float]]] = {}) -> str:
        """Prometheus text format of the request counters and histograms plus, from the caller,
        ``gauges`` and ``counters``: name -> (help, {((label, value), ...): value})."""
        families: list = []
        with self._lock:
            for name, (help_text, label_names) in COUNTERS.items():
                family = CounterMetricFamily(name, help_text, labels=list(label_names))
                for labels, value in sorted(self._values[name].items()):
                    family.add_metric(list(labels), value)
                families.append(family)
            for name, (help_text, _) in HISTOGRAMS.items():
                family = HistogramMetricFamily(name, help_text, labels=list(REQUEST_LABELS))
                for labels, hist in sorted(self._histograms[name].items()):
                    family.add_metric(list(labels), hist.buckets(), hist.total)
                families.append(family)
        for kind, extra in ((CounterMetricFamily, counters), (GaugeMetricFamily, gauges)):
            for name, (help_text, series) in extra.items():
                family = kind(name, help_text, labels=[k for k, _ in next(iter(series), ())])
                for labels, value in series.items():
                    family.add_metric([v for _, v in labels], value)
                families.append(family)
        return generate_latest(_Families(families)).decode()


class _Families:
    """Just enough of a CollectorRegistry for prometheus_client.generate_latest."""

    def __init__(self, families: list) -> None:
        self.families = families

    def collect(self):
        return iter(self.families)
