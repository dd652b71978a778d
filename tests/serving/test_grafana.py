"""deploy/grafana-osd.json queries only metrics osd really exports through Ray."""

from __future__ import annotations

import json
import re
from pathlib import Path

from ray.util.metrics import Counter, Gauge, Histogram

from actors.ray_metrics import RayServingMetrics, RayTrainerMetrics

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana-osd.json"
SUFFIXES = {Counter: ("_total",), Gauge: ("",), Histogram: ("_bucket", "_sum", "_count")}


def exported_names() -> set[str]:
    """What Ray's metrics agent exports for osd's metric objects (it prefixes 'ray_')."""
    names = set()
    for holder in (RayServingMetrics(), RayTrainerMetrics()):
        for value in vars(holder).values():
            for metric in value.values() if isinstance(value, dict) else [value]:
                kind = next(k for k in SUFFIXES if isinstance(metric, k))
                names |= {f"ray_{metric._name}{s}" for s in SUFFIXES[kind]}
    return names


def test_grafana_dashboard_queries_exported_metrics():
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs += [a["expr"] for a in dashboard["annotations"]["list"]]
    used = {m for e in exprs for m in re.findall(r"ray_osd_\w+", e)}
    assert len(dashboard["panels"]) >= 8 and used
    assert used <= exported_names(), f"unknown metrics: {sorted(used - exported_names())}"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(set(ids)) == len(ids)
