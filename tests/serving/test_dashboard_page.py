"""The drift dashboard page alone (osd/serving/static/dashboard.html), in headless Chromium.

A tiny FastAPI app serves the page and a synthetic ``DashboardData`` (built with the pydantic
models, so it is valid by construction); the page records what it drew in data-* attributes,
which we read from the DOM Chromium dumps after the scripts ran.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import matplotlib.image
import numpy as np
from support.browser import Dom, artifact_path, chromium, render  # noqa: F401  (chromium is a fixture)
from fastapi import FastAPI
from fastapi.responses import HTMLResponse, JSONResponse
from support.http_server import serving

import osd
from osd.serving.dashboard_schema import (
    BacklogPoint,
    ClusterRow,
    DashboardData,
    RequestPoint,
    SourceShare,
    SwapEvent,
    TrainerPoint,
)

PAGE = Path(osd.__file__).parent / "serving" / "static" / "dashboard.html"
NOW = 1_760_000_000.0  # fixed, so the synthetic history is the same on every run
WINDOW = 20


# ---------- synthetic data ----------

def _alpha_base(version: int) -> float:
    return 0.45 + 0.12 * version  # each promoted draft accepts a bit more


def synthetic_data() -> DashboardData:
    """Two clusters, 120 requests over 20 minutes, 3 swaps, backlog and trainer points."""
    rng = random.Random(0)
    start = NOW - 20 * 60
    # Swap times (seconds after start): math gets v1 then v2, chat gets v1 in between.
    swaps = [SwapEvent(t=start + 300, cluster="math", version=1, kind="promoted"),
             SwapEvent(t=start + 560, cluster="chat", version=1, kind="promoted"),
             SwapEvent(t=start + 840, cluster="math", version=2, kind="promoted")]

    def live_version(cluster: str, t: float) -> int:
        return max([s.version for s in swaps if s.cluster == cluster and s.t <= t], default=0)

    series: dict[str, list[RequestPoint]] = {}
    for cluster, offset in (("chat", 0.0), ("math", 5.0)):
        points, alphas, tpfs, tpss, speedups = [], [], [], [], []
        for i in range(60):
            t = start + offset + i * 20.0 + rng.uniform(0, 4)
            version = live_version(cluster, t)
            alpha = min(0.97, max(0.05, _alpha_base(version) + rng.gauss(0, 0.06)))
            tpf = (1 - alpha ** 5) / (1 - alpha)  # expected tokens per target forward, 4 drafted
            alphas, tpfs = (alphas + [alpha])[-WINDOW:], (tpfs + [tpf])[-WINDOW:]
            tpss = (tpss + [tpf * 21.0 * rng.uniform(0.9, 1.1)])[-WINDOW:]
            speedups = (speedups + [tpf * rng.uniform(0.75, 0.85)])[-WINDOW:]  # a round costs more than one step
            points.append(RequestPoint(t=t, version=version, alpha=alpha, alpha_ma=sum(alphas) / len(alphas),
                                       tokens_per_forward_ma=sum(tpfs) / len(tpfs),
                                       tokens_per_s_ma=sum(tpss) / len(tpss), latency_s=rng.uniform(0.5, 3.0),
                                       speedup=speedups[-1], speedup_ma=sum(speedups) / len(speedups),
                                       target_step_s=0.048))
        series[cluster] = points

    backlog = []
    for i in range(41):
        t = start + i * 30.0
        for cluster, scale in (("chat", 1.0), ("math", 0.6)):
            length = int(scale * (40 + 25 * i))
            lag = int(scale * (30 + 25 * math.sin(i / 4) ** 2 * 4))
            backlog.append(BacklogPoint(t=t, cluster=cluster, length=length, pending=int(scale * 12),
                                        lag=None if i == 20 else lag))  # one missing sample: a gap

    trainer = []
    for cluster in ("chat", "math"):
        promotions = {s.t: s.version for s in swaps if s.cluster == cluster}
        for update in range(1, 10):
            t = start + update * 120.0 + (0 if cluster == "chat" else 30)
            promoted_at = next((ts for ts in promotions if abs(ts - t) < 60), None)
            live = _alpha_base(live_version(cluster, t - 1))
            trainer.append(TrainerPoint(
                t=promoted_at if promoted_at is not None else t, cluster=cluster, update=update,
                loss=1.6 * math.exp(-update / 5) + rng.uniform(0, 0.05),
                alpha_candidate=live + (0.1 if promoted_at is not None else rng.uniform(-0.04, 0.03)),
                alpha_live=live, promoted=promoted_at is not None,
                version=promotions[promoted_at] if promoted_at is not None else None))
    trainer.sort(key=lambda p: p.t)

    clusters = [
        ClusterRow(cluster="chat", live_version=1, alpha_now=series["chat"][-1].alpha_ma, alpha_hour_ago=0.52,
                   requests=60, last_update=NOW - 110, speedup_now=series["chat"][-1].speedup_ma, target_step_s=0.048),
        ClusterRow(cluster="math", live_version=2, alpha_now=series["math"][-1].alpha_ma, alpha_hour_ago=None,
                   requests=60, last_update=NOW - 40, speedup_now=series["math"][-1].speedup_ma, target_step_s=0.048),
    ]
    return DashboardData(generated_at=NOW, window=WINDOW, retention_s=24 * 3600, clusters=clusters,
                         series=series, swaps=swaps, backlog=backlog, trainer=trainer)


def empty_data() -> DashboardData:
    return DashboardData(generated_at=NOW, window=WINDOW, retention_s=24 * 3600, clusters=[], series={},
                         swaps=[], backlog=[], trainer=[])


def dashboard_app(responses, prefix: str = "") -> FastAPI:
    """Serves the page at <prefix>/dashboard; /data answers with responses[i] on the i-th call
    (the last one repeats): a DashboardData, or an int status code for an error."""
    app = FastAPI()
    calls = {"n": 0}

    @app.get(f"{prefix}/dashboard")
    def page():
        return HTMLResponse(PAGE.read_text())

    @app.get(f"{prefix}/dashboard/data")
    def data():
        response = responses[min(calls["n"], len(responses) - 1)]
        calls["n"] += 1
        if isinstance(response, int):
            return JSONResponse({"detail": "dashboard store unavailable"}, status_code=response)
        return JSONResponse(response.model_dump(mode="json"))

    app.state.calls = calls
    return app


# ---------- reading the dumped DOM ----------

# ---------- tests ----------

def yticks(dom: Dom, chart: str) -> list[str]:
    """The y-axis tick labels a chart printed, bottom up."""
    return dom.all(tag="canvas", data_chart=chart)[0]["data-yticks"].split("|")


def test_dashboard_draws_synthetic_data(chromium):
    shot = artifact_path("dashboard_synthetic.png")
    data = synthetic_data()
    with serving(dashboard_app([data])) as url:
        html = render(f"{url}/dashboard", shot, window=(1366, 1240))
    artifact_path("dashboard_synthetic.html").write_text(html)
    dom = Dom(html)

    assert int(dom.body()["data-rendered"]) >= 1
    assert "data-error" not in dom.body()
    assert dom.by_id("banner").get("hidden") is not None

    for panel in ("chart-alpha", "chart-speedup", "chart-tpf", "chart-tps", "chart-backlog", "chart-trainer",
                  "clusters-table"):
        assert dom.empty_state(panel).get("hidden") is not None, panel
    alpha = dom.by_id("chart-alpha")
    assert alpha["data-series"] == "chat,math"
    # Swap markers in time order, labelled with version and (two clusters) cluster name.
    assert alpha["data-markers"] == "v1 math,v1 chat,v2 math"
    assert alpha["data-points"] == "120"
    assert "last 20 requests" in alpha["text"]
    assert dom.all(tag="canvas", data_chart="alpha")[0]["data-series"] == "chat,math"

    for panel in ("chart-speedup", "chart-tpf", "chart-tps"):
        assert dom.by_id(panel)["data-series"] == "chat,math"
        assert dom.by_id(panel)["data-points"] == "120"
    backlog = dom.by_id("chart-backlog")
    assert backlog["data-series"] == ",".join(sorted(f"{c}:{k}" for c in ("chat", "math")
                                                     for k in ("length", "pending", "lag")))
    assert int(backlog["data-points"]) == 2 * 41 * 3 - 2  # the two missing lag samples are gaps
    trainer = dom.by_id("chart-trainer")
    assert trainer["data-empty"] == "false"
    assert trainer["data-markers"] == "v1,v1,v2"  # promoted updates in time order: math v1, chat v1, math v2
    assert int(trainer["data-points"]) == 18 + 18 * 2  # loss + candidate + live per update

    rows = dom.all(tag="tr", data_cluster="chat") + dom.all(tag="tr", data_cluster="math")
    assert [(r["data-cluster"], r["data-live-version"]) for r in rows] == [("chat", "1"), ("math", "2")]
    assert "v2" in rows[1]["text"] and "—" in rows[1]["text"]  # math has no α̂ an hour ago
    assert "+" in rows[0]["text"] and "min ago" in rows[0]["text"]
    # The measured speedup sits next to α̂ now: the row's value, and its cell as printed.
    speedups = [r.speedup_now for r in data.clusters]
    assert [r["data-speedup"] for r in rows] == [f"{v:.4f}" for v in speedups]
    assert [td["text"] for td in dom.all(tag="td", data_col="speedup")] == [f"{v:.2f}×" for v in speedups]
    assert "1.0" in yticks(dom, "speedup")  # the target alone (1×) is always in range, drawn as a reference line
    for chart in ("alpha", "speedup", "tpf", "tps", "backlog", "loss", "gate"):
        ticks = yticks(dom, chart)
        assert len(ticks) >= 3 and len(set(ticks)) == len(ticks), (chart, ticks)

    assert shot.stat().st_size > 20_000
    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[:2] == (1240, 1366)
    assert len(np.unique(pixels[..., :3].reshape(-1, 3), axis=0)) > 50  # not a blank page


def test_accepted_tokens_by_source_table(chromium):
    """A cluster whose window accepted tokens gets a row of shares by source (its latest point's);
    one without them gets none, and with none anywhere the table stays hidden."""
    data = synthetic_data()
    share = SourceShare(draft=0.5, suffix=0.375, both=0.125)
    chat = [p.model_copy(update={"source_share_ma": share}) for p in data.series["chat"]]
    with_shares = data.model_copy(update={"series": {**data.series, "chat": chat}})
    with serving(dashboard_app([with_shares])) as url:
        dom = Dom(render(f"{url}/dashboard", window=(1366, 1020)))
    assert dom.by_id("sources").get("hidden") is None
    (row,) = dom.all(tag="tr", data_source_cluster="chat")
    assert (row["data-draft"], row["data-suffix"], row["data-both"]) == ("0.5000", "0.3750", "0.1250")
    assert row["text"] == "chat" + "50%" + "38%" + "13%"  # the cells, in order (0.375 rounds to 38%)
    assert not dom.all(tag="tr", data_source_cluster="math")
    assert "last 20 requests" in dom.by_id("sources")["text"]
    assert len(dom.all(tag="tr", data_cluster="chat")) == 1  # the clusters table keeps its one row per cluster

    with serving(dashboard_app([synthetic_data()])) as url:
        dom = Dom(render(f"{url}/dashboard", window=(1366, 1020)))
    assert int(dom.body()["data-rendered"]) >= 1
    assert dom.by_id("sources").get("hidden") is not None and not dom.all(tag="tr", data_source_cluster="chat")


def test_failed_fetch_shows_banner(chromium):
    with serving(dashboard_app([503])) as url:
        dom = Dom(render(f"{url}/dashboard"))
    assert "HTTP 503" in dom.body()["data-error"]
    banner = dom.by_id("banner")
    assert banner.get("hidden") is None
    assert banner["text"].startswith("data unavailable: HTTP 503")
    assert "dashboard store unavailable" in banner["text"]
    assert "data-rendered" not in dom.body()
    assert dom.empty_state("chart-alpha")["text"] == "Waiting for data…"


def test_failed_refresh_keeps_charts_and_retries(chromium):
    """First fetch works, the next ones fail: the charts stay, the banner shows, it keeps polling.
    Also serves the page under a route prefix, which the relative data URL must follow."""
    app = dashboard_app([synthetic_data(), 503], prefix="/osd")
    with serving(app) as url:
        # Virtual time: 12 s covers the first fetch and two 5 s refreshes.
        dom = Dom(render(f"{url}/osd/dashboard", budget_ms=12_000))
    assert app.state.calls["n"] >= 3
    assert dom.body()["data-rendered"] == "1"
    assert "HTTP 503" in dom.body()["data-error"]
    assert dom.by_id("banner").get("hidden") is None
    assert dom.by_id("chart-alpha")["data-series"] == "chat,math"
    assert "last good refresh" in dom.by_id("status")["text"]


def test_empty_data_shows_empty_states(chromium):
    shot = artifact_path("dashboard_empty.png")
    with serving(dashboard_app([empty_data()])) as url:
        dom = Dom(render(f"{url}/dashboard", shot, window=(1366, 800)))
    assert int(dom.body()["data-rendered"]) >= 1  # a slow browser may see the 5 s refresh too
    for panel, message in (("chart-alpha", "No requests served with a draft yet"),
                           ("chart-speedup", "No requests with a measured target step yet"), ("chart-tpf", "No requests yet"),
                           ("chart-tps", "No requests yet"), ("chart-backlog", "No buffer samples yet"),
                           ("chart-trainer", "No trainer updates yet"), ("clusters-table", "No clusters yet"),
                           ("swaps-log", "No draft swaps yet")):
        section, empty = dom.by_id(panel), dom.empty_state(panel)
        assert empty["text"] == message and empty.get("hidden") is None, panel
        if panel.startswith("chart-"):
            assert (section["data-empty"], section["data-points"], section["data-series"]) == ("true", "0", "")
    assert not dom.all(tag="tr", data_cluster="chat")
    assert shot.stat().st_size > 0


def burst_data(span_s: float, swaps_within_s: float) -> DashboardData:
    """One cluster, 40 requests over span_s; 5 promotions then 2 rollbacks, all within
    swaps_within_s near the start: the shape of a quick demo or test run (a label pile-up)."""
    start = NOW - span_s
    series = {"global": [RequestPoint(t=start + span_s * i / 39, version=0, alpha=0.9, alpha_ma=0.9,
                                      tokens_per_forward_ma=1.6, tokens_per_s_ma=400.0, latency_s=0.1)
                         for i in range(40)]}
    versions, kinds = [1, 2, 3, 4, 5, 4, 5], ["promoted"] * 5 + ["rollback"] * 2
    swaps = [SwapEvent(t=start + 1 + swaps_within_s * i / 6, cluster="global", version=v, kind=k)
             for i, (v, k) in enumerate(zip(versions, kinds))]
    trainer = [TrainerPoint(t=start + 1 + swaps_within_s * i / 6, cluster="global", update=i + 1, loss=0.03,
                            alpha_candidate=0.9 + 0.01 * i, alpha_live=0.89 + 0.01 * i, promoted=True, version=i + 1)
               for i in range(5)]
    backlog = [BacklogPoint(t=NOW, cluster="global", length=8, pending=0, lag=0)]
    clusters = [ClusterRow(cluster="global", live_version=5, alpha_now=0.9, alpha_hour_ago=None, requests=40,
                           last_update=NOW)]
    return DashboardData(generated_at=NOW + 1, window=10, retention_s=168 * 3600, clusters=clusters,
                         series=series, swaps=swaps, backlog=backlog, trainer=trainer)


def test_burst_fills_the_time_axis_and_keeps_labels_apart(chromium):
    """Everything within 5 s: the axis fits the data in seconds, and every swap keeps its own label."""
    with serving(dashboard_app([burst_data(span_s=5, swaps_within_s=2)])) as url:
        dom = Dom(render(f"{url}/dashboard", window=(1366, 800)))
    alpha = dom.all(tag="canvas", data_chart="alpha")[0]
    assert alpha["data-markers"] == "v1,v2,v3,v4,v5,v4,v5"
    assert alpha["data-labels"] == alpha["data-markers"]  # staggered, not merged: there is room
    ticks = alpha["data-xticks"].split(",")
    # A 5 s axis, not a minute with the data against its right edge: ticks one or two seconds apart.
    assert len(ticks) >= 3 and all(len(t) == len("12:34:56") for t in ticks), ticks
    gate = dom.all(tag="canvas", data_chart="gate")[0]
    assert gate["data-markers"] == gate["data-labels"] == "v1,v2,v3,v4,v5"


def test_swaps_too_close_to_label_apart_merge_into_one_label(chromium):
    """The same burst in a 2 h history: the swaps are pixels apart, so their labels merge into a
    "vA–vB" range; data-markers still lists every one, in time order."""
    with serving(dashboard_app([burst_data(span_s=2 * 3600, swaps_within_s=20)])) as url:
        dom = Dom(render(f"{url}/dashboard", window=(1366, 800)))
    alpha = dom.by_id("chart-alpha")
    assert alpha["data-markers"] == "v1,v2,v3,v4,v5,v4,v5"
    labels = alpha["data-labels"].split(",")
    assert len(labels) < 7 and any("–" in label for label in labels), labels
    ticks = dom.all(tag="canvas", data_chart="alpha")[0]["data-xticks"].split(",")
    # Minutes, not seconds (a tick at midnight may show the date instead, in some time zones).
    assert len(ticks) >= 3 and not any(t.count(":") == 2 for t in ticks), ticks
    assert dom.by_id("chart-trainer")["data-markers"] == "v1,v2,v3,v4,v5"


def test_speedup_is_a_dash_until_measured_never_zero(chromium):
    """math's replica never measured the target's single-token step: its row prints "—" (no
    data-speedup), its speedup line is absent, and chat's is drawn alone; with no measured step
    anywhere the speedup panel shows its empty state, while the α̂ chart still draws."""
    data = synthetic_data()
    unmeasured = {"speedup": None, "speedup_ma": None, "target_step_s": None}
    math = [p.model_copy(update=unmeasured) for p in data.series["math"]]
    rows = [r if r.cluster == "chat" else r.model_copy(update={"speedup_now": None, "target_step_s": None})
            for r in data.clusters]
    partly = data.model_copy(update={"series": {**data.series, "math": math}, "clusters": rows})
    with serving(dashboard_app([partly])) as url:
        dom = Dom(render(f"{url}/dashboard", window=(1366, 1240)))
    chat, math_row = dom.all(tag="tr", data_cluster="chat")[0], dom.all(tag="tr", data_cluster="math")[0]
    assert chat["data-speedup"] == f"{rows[0].speedup_now:.4f}" and "data-speedup" not in math_row
    cells = dom.all(tag="td", data_col="speedup")
    assert [c["text"] for c in cells] == [f"{rows[0].speedup_now:.2f}×", "—"]
    assert cells[1]["title"] == "not measured yet" and "0.00" not in math_row["text"]
    assert "48.00 ms per token" in cells[0]["title"]  # the yardstick: target_step_s, in ms
    assert dom.by_id("chart-speedup")["data-series"] == "chat"
    assert int(dom.by_id("chart-speedup")["data-points"]) == len(data.series["chat"])

    nothing = {c: [p.model_copy(update=unmeasured) for p in pts] for c, pts in data.series.items()}
    none_rows = [r.model_copy(update={"speedup_now": None, "target_step_s": None}) for r in data.clusters]
    with serving(dashboard_app([data.model_copy(update={"series": nothing, "clusters": none_rows})])) as url:
        dom = Dom(render(f"{url}/dashboard", window=(1366, 1240)))
    assert dom.by_id("chart-speedup")["data-empty"] == "true"
    assert dom.empty_state("chart-speedup")["text"] == "No requests with a measured target step yet"
    assert dom.empty_state("chart-speedup").get("hidden") is None
    assert dom.by_id("chart-alpha")["data-series"] == "chat,math"
    assert [c["text"] for c in dom.all(tag="td", data_col="speedup")] == ["—", "—"]


def test_close_values_get_distinct_tick_labels(chromium):
    """A gate α̂ between 0.0921 and 0.0925, a loss between 2.50001 and 2.50005: every tick label
    reads differently, with the decimals the tick step needs (capped at three, the gate's ticks
    all printed 0.092)."""
    data = burst_data(span_s=600, swaps_within_s=60)
    trainer = [p.model_copy(update={"alpha_candidate": 0.0921 + 0.0001 * i, "alpha_live": 0.0921 + 0.00005 * i,
                                    "loss": 2.50001 + 0.00001 * i})
               for i, p in enumerate(data.trainer)]
    with serving(dashboard_app([data.model_copy(update={"trainer": trainer})])) as url:
        dom = Dom(render(f"{url}/dashboard", window=(1366, 800)))
    for chart, lo, hi, decimals in (("gate", 0.0921, 0.0925, 4), ("loss", 2.50001, 2.50005, 5)):
        ticks = yticks(dom, chart)
        values = [float(t) for t in ticks]
        assert len(ticks) >= 3 and len(set(ticks)) == len(ticks), (chart, ticks)
        assert values == sorted(values) and values[0] <= lo + 1e-12 and values[-1] >= hi - 1e-12, (chart, ticks)
        # As many decimals as the step needs, no more: 0.0920, 0.0922, … (not 0.092000).
        assert {len(t.split(".")[1]) for t in ticks} == {decimals}, (chart, ticks)
