"""osd's metrics as Ray metrics, so Ray's metrics agent exports them to Prometheus beside Ray's own.

Ray exports each node's metrics at ``http://<node>:<metrics_export_port>/metrics`` with a
``ray_`` prefix: ``osd:spec_decode_num_draft_tokens`` becomes
``ray_osd_spec_decode_num_draft_tokens_total`` there. The replicas' /metrics endpoint serves
the same numbers in osd's own names; use one or the other in a Prometheus config, not both
(deploy/README.md, deploy/grafana-osd.json).
"""

from __future__ import annotations

from ray.util.metrics import Counter, Gauge, Histogram

from osd.data.buffer import BufferStats
from osd.data.recorder import RecorderStats
from osd.serving.metrics import COUNTERS, HISTOGRAMS, REQUEST_LABELS
from trainers.distiller import UpdateResult
from trainers.gate import GateDecision


def ray_metric_name(name: str) -> str:
    """'osd:spec_decode_num_drafts' -> 'osd_spec_decode_num_drafts' (Ray adds its 'ray_' prefix on export)."""
    return name.replace(":", "_")


class RayServingMetrics:
    """A ``MetricsMirror`` for ``ServingMetrics``: every request counter and histogram, as Ray metrics."""

    def __init__(self) -> None:
        self.counters = {name: Counter(ray_metric_name(name), description=help_text, tag_keys=labels)
                         for name, (help_text, labels) in COUNTERS.items()}
        self.histograms = {name: Histogram(ray_metric_name(name), description=help_text, boundaries=list(bounds),
                                           tag_keys=REQUEST_LABELS)
                           for name, (help_text, bounds) in HISTOGRAMS.items()}

        # The recorder's state, set by the replica's poll thread (Ray gauges are per worker: sum them).
        self.recorder = {field: Gauge(f"osd_recorder_{field}", description=text)
                         for field, text in (("spooled", "Training records spooled while the buffer is down."),
                                             ("queued", "Training records not yet pushed to the buffer."),
                                             ("dropped", "Training records dropped since the replica started."))}
        self.draft_version = Gauge("osd_draft_version", description="Draft version a replica serves, per cluster.",
                                   tag_keys=("cluster",))
        # A replica's suffix traffic index per cluster (as osd:suffix_traffic_* on /metrics; replicas converge on the
        # same traffic through the buffer, so aggregate with max).
        self.traffic = {field: Gauge(f"osd_suffix_traffic_{field}", description=text, tag_keys=("cluster",))
                        for field, text in (("tokens", "Tokens in the cluster's suffix traffic index."),
                                            ("requests", "Requests in the cluster's suffix traffic index."))}

    def add(self, name: str, labels: dict[str, str], value: float) -> None:
        self.counters[name].inc(value, tags=labels)

    def observe(self, name: str, labels: dict[str, str], value: float) -> None:
        self.histograms[name].observe(value, tags=labels)


    def observe_replica(self, recorder: RecorderStats, drafts: dict[str, int],
                        traffic: dict[str, dict[str, int]] | None = None) -> None:
        """traffic: ServingCore.health()["suffix"]["traffic"] (cluster -> {tokens, requests, entries})."""
        for field, gauge in self.recorder.items():
            gauge.set(getattr(recorder, field))
        for cluster, version in drafts.items():
            self.draft_version.set(version, tags={"cluster": cluster})
        for cluster, stats in (traffic or {}).items():
            for field, gauge in self.traffic.items():
                gauge.set(stats[field], tags={"cluster": cluster})


class RayTrainerMetrics:
    """The trainer's updates, gate verdicts and loss as Ray metrics (labelled by cluster)."""

    def __init__(self) -> None:
        tags = ("cluster",)
        self.updates = Counter("osd_trainer_updates", description="Trainer updates.", tag_keys=tags)
        self.promotions = Counter("osd_trainer_promotions", description="Candidates promoted.", tag_keys=tags)
        self.rejections = Counter("osd_trainer_rejections", description="Candidates refused.", tag_keys=tags)
        self.records = Counter("osd_trainer_records_trained", description="Records trained on.", tag_keys=tags)
        self.loss = Gauge("osd_trainer_loss", description="Loss of the last update.", tag_keys=tags)
        self.alpha = Gauge("osd_trainer_gate_alpha", description="Gate alpha-hat of the last update, candidate "
                                                                 "and live, on held-out records.",
                           tag_keys=("cluster", "draft"))
        self.backlog = {field: Gauge(f"osd_buffer_{field}", description=text, tag_keys=tags)
                        for field, text in (("length", "Training records in the cluster's buffer stream."),
                                            ("pending", "Records delivered to a trainer, not yet acked."),
                                            ("lag", "Records not yet delivered to a trainer."))}

    def observe_update(self, cluster: str, result: UpdateResult, decision: GateDecision) -> None:
        tags = {"cluster": cluster}
        self.updates.inc(1, tags=tags)
        (self.promotions if decision.promote else self.rejections).inc(1, tags=tags)
        if result.records:
            self.records.inc(result.records, tags=tags)
        self.loss.set(result.loss, tags=tags)
        self.alpha.set(decision.candidate_alpha, tags={**tags, "draft": "candidate"})
        self.alpha.set(decision.live_alpha, tags={**tags, "draft": "live"})

    def observe_backlog(self, stats: BufferStats) -> None:
        for field, gauge in self.backlog.items():
            if (value := getattr(stats, field)) is not None:
                gauge.set(value, tags={"cluster": stats.cluster})
