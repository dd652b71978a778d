"""`osd bench clusters`: per-query-cluster drafts against one global draft, on a mixed stream (issue 5).

A stream mixing several Spec-Bench categories (default math_reasoning, translation,
summarization, qa; ``stream`` questions each, shuffled with a fixed seed) is distilled three
ways, all from the same untrained draft (the target's first 2 layers, embeddings and head
frozen: bench distill's winner) with the same settings (FKL, AdamW lr 3e-3, 4 steps per
update of 8 records):

(a) untrained: no training at all;
(b) global: one OnlineDistiller fed the whole stream in order;
(c) per-cluster: the Router (default features, k = number of categories, in memory, chat
    template stripped) assigns every stream prompt a cluster in stream order; one
    OnlineDistiller per cluster is fed that cluster's records in stream order, each
    starting from the untrained draft;
(d) per-category (oracle routing): (c) with the true category as the cluster id, the
    ceiling (c) would reach with a perfect router.

(b), (c) and (d) train on exactly the same records (no record is held back: the
distillers' own gate split is off, the held-out set below is separate); every record a
distiller still holds at the end of the stream is flushed in one last update.

Held-out α̂ (PromotionGate's Σ min(p, q) over the stored teacher rows: no generation, no
target forward) is pooled per category over ``heldout`` questions of each category that
the stream never contains (the category's last ones). In (c) a held-out prompt is routed
by the same router after the stream and scored with its cluster's draft (the untrained
one if its cluster trained nothing). The router's purity against the true categories is
reported for the stream and the held-out prompts.

Records (target + the untrained draft, greedy) are generated once with the engine and
cached as codec bytes (``--reuse-records`` skips generation). The core
(``run_clusters_bench``) takes records, labels and a routing function, so tests run it on
tiny random models with a fake router; ``run_clusters_bench_command`` is the SmolLM2
command line around it.
"""

from __future__ import annotations

import argparse
import random
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from tqdm.auto import tqdm

from bench.distill import bytes_per_position, load_records, save_records
from bench.report import environment, table, update_doc_section, write_json
from osd.config import EngineConfig, SamplingParams
from osd.data.records import TrainingRecord
from osd.decoding.engine import SpeculativeEngine
from osd.models.drafts import DraftModel
from osd.router import purity
from trainers.config import DistillConfig
from trainers.distiller import OnlineDistiller
from trainers.gate import PromotionGate

DEFAULT_CATEGORIES = ("math_reasoning", "translation", "summarization", "qa")
GAIN_GOAL = 0.05  # the aim: per-cluster beats global by this much mean held-out α̂
ARMS = ("untrained", "global", "per_cluster", "oracle")
UNTRAINED = "untrained"  # draft key of the untrained draft (and the fallback of an untrained cluster)


@dataclass
class ClustersBenchSettings:
    """Every knob of the benchmark; the defaults are the full run (~15–30 min on 2 busy CPU cores)."""

    categories: tuple[str, ...] = DEFAULT_CATEGORIES
    stream_per_category: int = 24
    heldout_per_category: int = 8
    max_tokens: int = 96
    teacher_top_k: int = 64
    gamma: int = 4  # only for generating the records: greedy output is the target's whatever γ is
    # distillation, as bench distill's winner (first2_frozen) and bench drift
    loss: str = "fkl"
    lr: float = 3e-3
    update_interval: int = 8
    steps_per_update: int = 4
    batch_size: int = 8
    seed: int = 0  # stream shuffle and the distillers' batch order

    @classmethod
    def quick(cls) -> ClustersBenchSettings:
        """A smoke test in a few minutes: 2 categories × (3 stream + 2 held-out), 16 tokens."""
        return cls(categories=DEFAULT_CATEGORIES[:2], stream_per_category=3, heldout_per_category=2, max_tokens=16,
                   update_interval=2, steps_per_update=1)

    def distill_config(self) -> DistillConfig:
        # holdout_fraction 0: the benchmark keeps its own held-out set, and a per-distiller
        # split would hold back different records in (b) and (c).
        return DistillConfig(loss=self.loss, lr=self.lr, update_interval=self.update_interval,
                             steps_per_update=self.steps_per_update, batch_size=self.batch_size, holdout_fraction=0.0,
                             freeze_embeddings=True, freeze_head=True, seed=self.seed)


# --------------------------------------------------------------------------- the stream


def mixed_stream(questions: Sequence[dict], categories: Sequence[str], stream_per_category: int,
                 heldout_per_category: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(stream, held-out) question rows.

    Per category (file order): the first ``stream_per_category`` questions join the stream,
    the last ``heldout_per_category`` are held out (never in the stream). The stream is
    then shuffled with ``random.Random(seed)``: the same questions, the same order, every
    run; each category exactly ``stream_per_category`` times. Held-out rows stay grouped by
    category.
    """
    if len(set(categories)) != len(categories) or not categories:
        raise ValueError(f"categories must be distinct and non-empty, got {list(categories)}")
    if stream_per_category < 1 or heldout_per_category < 1:
        raise ValueError("stream and held-out prompts per category must both be at least 1")
    stream, heldout = [], []
    for category in categories:
        rows = [q for q in questions if q["category"] == category]
        if stream_per_category + heldout_per_category > len(rows):
            raise ValueError(f"category {category!r} has {len(rows)} questions; {stream_per_category} stream + "
                             f"{heldout_per_category} held-out prompts must not exceed that")
        stream += rows[:stream_per_category]
        heldout += rows[len(rows) - heldout_per_category:]
    random.Random(seed).shuffle(stream)
    return stream, heldout


def generate_records(target, tokenizer, draft: DraftModel | None, prompts: Sequence[list[int]],
                     s: ClustersBenchSettings, progress: bool = True) -> tuple[list[TrainingRecord], list[dict]]:
    """The engine (target + untrained draft, greedy) serves every prompt; returns (records, per-request stats)."""
    engine = SpeculativeEngine(target, tokenizer, draft,
                               EngineConfig(speculation="always", gamma=s.gamma, teacher_top_k=s.teacher_top_k, record=True))
    params = SamplingParams(max_tokens=s.max_tokens)
    engine.generate(prompts[0][:16], SamplingParams(max_tokens=4))  # warm-up: one-off kernel setup
    records, stats = [], []
    for prompt in tqdm(prompts, desc="records (engine, greedy)", unit="req", disable=not progress):
        gen = engine.generate(prompt, params)
        records.append(gen.record)
        st = gen.stats
        stats.append({"tokens": st.output_tokens, "seconds": st.elapsed_s, "beta_sum": st.beta_sum,
                      "beta_count": st.beta_count})
    return records, stats


# --------------------------------------------------------------------------- training


@dataclass
class Trained:
    """One distiller's outcome: its draft and what it trained on."""

    draft: DraftModel
    request_ids: list[str] = field(default_factory=list)  # records fed, in order
    updates: int = 0
    steps: int = 0
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)  # mean loss per update

    def summary(self) -> dict:
        return {"records": len(self.request_ids), "updates": self.updates, "steps": self.steps,
                "seconds": self.seconds, "first_loss": self.losses[0] if self.losses else None,
                "last_loss": self.losses[-1] if self.losses else None}


def train_online(base: DraftModel, records: Sequence[TrainingRecord], keys: Sequence[str], config: DistillConfig,
                 *, progress: bool = True, desc: str = "train") -> dict[str, Trained]:
    """One OnlineDistiller per distinct key, each fed its records in stream order, all starting from ``base``.

    keys[i] names the distiller record i trains (one key for a global draft, the cluster id
    for per-cluster drafts). Records still pending at the end are flushed in one last update.
    """
    if len(keys) != len(records):
        raise ValueError(f"{len(records)} records but {len(keys)} keys")
    distillers: dict[str, OnlineDistiller] = {}
    out: dict[str, Trained] = {}

    def note(key: str, results) -> None:
        for r in results:
            out[key].updates += 1
            out[key].steps += r.steps
            out[key].seconds += r.seconds
            out[key].losses.append(r.loss)

    for rec, key in tqdm(list(zip(records, keys)), desc=desc, unit="rec", disable=not progress):
        if key not in distillers:
            distillers[key] = OnlineDistiller(base, config)  # a private copy of the untrained draft
            out[key] = Trained(draft=base)
        out[key].request_ids.append(rec.request_id)
        note(key, distillers[key].add(rec))
    for key, distiller in distillers.items():
        final = distiller.maybe_update(force=True)
        note(key, [final] if final else [])
        out[key].draft = distiller.candidate()  # eval-mode copy; the optimizer state goes with the distiller
    return out


# --------------------------------------------------------------------------- scoring


def routed_alpha(records: Sequence[TrainingRecord], labels: Sequence[str], draft_keys: Sequence[str],
                 drafts: Mapping[str, DraftModel], gate: PromotionGate,
                 fallback: str = UNTRAINED) -> dict[str, dict]:
    """Held-out α̂ per label, each record scored by ``drafts[draft_keys[i]]`` (``drafts[fallback]`` if absent).

    Pooled over teacher rows within a label, as PromotionGate.score pools over a batch:
    {label: {"alpha_hat", "rows", "records"}}, labels in first-seen order.
    """
    if not len(records) == len(labels) == len(draft_keys):
        raise ValueError(f"{len(records)} records, {len(labels)} labels, {len(draft_keys)} draft keys: must match")
    groups: dict[str, dict[str, list[TrainingRecord]]] = {}
    for rec, label, key in zip(records, labels, draft_keys):
        groups.setdefault(label, {}).setdefault(key if key in drafts else fallback, []).append(rec)
    out = {}
    for label, by_key in groups.items():
        total, rows = 0.0, 0
        for key, recs in by_key.items():
            alpha, n = gate.score(drafts[key], recs)
            total, rows = total + alpha * n, rows + n
        out[label] = {"alpha_hat": total / rows if rows else None, "rows": rows,
                      "records": sum(len(r) for r in by_key.values())}
    return out


def _mean(values: Sequence[float | None]) -> float | None:
    seen = [v for v in values if v is not None]
    return sum(seen) / len(seen) if seen else None


def _cluster_order(ids) -> list[str]:
    """c0, c1, …, c10 in numeric order; anything else after, alphabetically."""
    return sorted(set(ids), key=lambda c: (0, int(c[1:]), "") if c[:1] == "c" and c[1:].isdigit() else (1, 0, c))


# --------------------------------------------------------------------------- the benchmark


def run_clusters_bench(base: DraftModel, stream: Sequence[TrainingRecord], stream_labels: Sequence[str],
                       heldout: Sequence[TrainingRecord], heldout_labels: Sequence[str],
                       route: Callable[[list[int]], str], settings: ClustersBenchSettings | None = None, *,
                       progress: bool = True, log: Callable[[str], None] = tqdm.write) -> dict:
    """Arms (a)–(d) of the module docstring on given records; returns the result dict (plain JSON).

    ``route``: prompt token ids → cluster id (``Router.route``); called on every stream
    prompt in stream order, then on every held-out prompt.
    """
    s = settings or ClustersBenchSettings()
    if len(stream) != len(stream_labels) or len(heldout) != len(heldout_labels):
        raise ValueError("one label per record: stream and held-out records and labels must have equal lengths")
    if not stream or not heldout:
        raise ValueError("the benchmark needs at least one stream record and one held-out record")
    config = s.distill_config()
    gate = PromotionGate(batch_size=s.batch_size, max_seq_len=config.max_seq_len)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    stream_assign = [route(list(r.prompt_ids)) for r in stream]
    heldout_assign = [route(list(r.prompt_ids)) for r in heldout]
    timings["routing"] = time.perf_counter() - t0
    purity_stream, purity_heldout = purity(stream_assign, list(stream_labels)), purity(heldout_assign, list(heldout_labels))
    log(f"[clusters] router: {len(set(stream_assign))} clusters over {len(stream)} stream prompts; purity "
        f"stream {purity_stream:.3f}, held-out {purity_heldout:.3f}")

    arms: dict[str, dict[str, Trained]] = {}
    for arm, keys in (("global", ["global"] * len(stream)), ("per_cluster", stream_assign),
                      ("oracle", list(stream_labels))):
        start = time.perf_counter()
        log(f"[clusters] training {arm}: {len(set(keys))} distiller(s) on {len(stream)} records in stream order")
        arms[arm] = train_online(base, stream, keys, config, progress=progress, desc=f"train {arm}")
        timings[f"train_{arm}"] = time.perf_counter() - start

    start = time.perf_counter()
    n = len(heldout)
    scores = {
        "untrained": routed_alpha(heldout, heldout_labels, [UNTRAINED] * n, {UNTRAINED: base}, gate),
        "global": routed_alpha(heldout, heldout_labels, ["global"] * n,
                               {UNTRAINED: base, "global": arms["global"]["global"].draft}, gate),
        "per_cluster": routed_alpha(heldout, heldout_labels, heldout_assign,
                                    {UNTRAINED: base, **{k: t.draft for k, t in arms["per_cluster"].items()}}, gate),
        "oracle": routed_alpha(heldout, heldout_labels, list(heldout_labels),
                               {UNTRAINED: base, **{k: t.draft for k, t in arms["oracle"].items()}}, gate),
    }
    categories = []
    for label in dict.fromkeys(heldout_labels):
        row = {"category": label, "heldout_records": scores["untrained"][label]["records"],
               "rows": scores["untrained"][label]["rows"],
               "stream_records": sum(1 for x in stream_labels if x == label),
               **{arm: scores[arm][label]["alpha_hat"] for arm in ARMS}}
        row["gain"] = (row["per_cluster"] - row["global"]
                       if row["per_cluster"] is not None and row["global"] is not None else None)
        categories.append(row)
    mean = {key: _mean([c[key] for c in categories]) for key in (*ARMS, "gain")}

    # Per cluster: what it holds and how each draft does on the held-out prompts routed to it.
    clusters = []
    per_cluster_drafts = {UNTRAINED: base, "global": arms["global"]["global"].draft,
                          **{k: t.draft for k, t in arms["per_cluster"].items()}}
    for cid in _cluster_order(stream_assign + heldout_assign):
        mine = [i for i, a in enumerate(heldout_assign) if a == cid]
        recs = [heldout[i] for i in mine]
        own = cid if cid in arms["per_cluster"] else UNTRAINED
        alpha = {name: (routed_alpha(recs, [cid] * len(recs), [key] * len(recs), per_cluster_drafts, gate)[cid]
                        ["alpha_hat"] if recs else None)
                 for name, key in (("untrained", UNTRAINED), ("global", "global"), ("own", own))}
        trained = arms["per_cluster"].get(cid)
        clusters.append({
            "cluster": cid,
            "stream_records": sum(1 for a in stream_assign if a == cid),
            "stream_composition": dict(Counter(l for a, l in zip(stream_assign, stream_labels) if a == cid).most_common()),
            "heldout_records": len(mine),
            "heldout_composition": dict(Counter(heldout_labels[i] for i in mine).most_common()),
            "own_draft": own != UNTRAINED,
            "training": trained.summary() if trained else None,
            "alpha": alpha,
        })
    timings["scoring"] = time.perf_counter() - start
    timings["total"] = time.perf_counter() - t0

    training = {arm: {key: t.summary() for key, t in trained.items()} for arm, trained in arms.items()}
    records_trained = {arm: sum(t["records"] for t in per.values()) for arm, per in training.items()}
    return {
        "benchmark": "clusters",
        "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(s).items()},
        "prompts": {"stream": len(stream), "heldout": len(heldout)},
        "router": {"clusters": _cluster_order(stream_assign + heldout_assign), "purity_stream": purity_stream,
                   "purity_heldout": purity_heldout, "stream_assignments": stream_assign,
                   "heldout_assignments": heldout_assign},
        "categories": categories,
        "mean": mean,
        "aim": {"gain_goal": GAIN_GOAL, "gain": mean["gain"],
                "met": mean["gain"] is not None and mean["gain"] >= GAIN_GOAL},
        "clusters": clusters,
        "training": training,
        "records_trained": records_trained,
        "timings_s": timings,
    }


# --------------------------------------------------------------------------- report


def _f(v, spec: str = ".3f") -> str:
    return "–" if v is None else format(v, spec)


def _composition(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items()) or "–"


def render_markdown(result: dict) -> str:
    s, r, m = result["settings"], result["router"], result["mean"]
    cats = result["categories"]
    env = result.get("environment", {})
    rows = [[c["category"], c["stream_records"], c["heldout_records"], c["rows"], _f(c["untrained"]), _f(c["global"]),
             _f(c["per_cluster"]), _f(c["gain"], "+.3f"), _f(c["oracle"])] for c in cats]
    rows.append(["**mean**", sum(c["stream_records"] for c in cats), sum(c["heldout_records"] for c in cats),
                 sum(c["rows"] for c in cats), _f(m["untrained"]), _f(m["global"]), _f(m["per_cluster"]),
                 f"**{_f(m['gain'], '+.3f')}**", _f(m["oracle"])])
    crow = [[c["cluster"], c["stream_records"], _composition(c["stream_composition"]),
             _composition(c["heldout_composition"]),
             f"{c['training']['updates']} / {c['training']['steps']}" if c["training"] else "– (untrained)",
             _f(c["alpha"]["untrained"]), _f(c["alpha"]["global"]), _f(c["alpha"]["own"])] for c in result["clusters"]]
    aim = result["aim"]
    verdict = "**met**" if aim["met"] else "**not met**"
    t = result["timings_s"]
    gen = result.get("records", {})
    gen_s = "cached" if gen.get("cached") else f"{t.get('records', 0) / 60:.1f} min"
    trained = result["records_trained"]
    return "\n".join([
        f"`osd bench clusters` ({env.get('date', '')}; {len(s['categories'])} Spec-Bench categories × "
        f"{s['stream_per_category']} stream + {s['heldout_per_category']} held-out prompts, {s['max_tokens']} tokens, "
        f"greedy). One stream, shuffled (seed {s['seed']}); the draft is the target's first 2 layers with "
        f"embeddings and head frozen, distilled with {s['loss'].upper()}, AdamW lr {s['lr']:g}, "
        f"{s['steps_per_update']} steps per update of {s['update_interval']} records. Global and per-cluster "
        f"drafts train on the same {trained['global']} records (per-cluster: {trained['per_cluster']}); every "
        "draft starts untrained. Router: default features (template-stripped embedding mean + log length), "
        f"k = {len(s['categories'])}, in memory; held-out prompts are routed after the stream and scored with their "
        "cluster's draft. Held-out α̂ = the promotion gate's Σ min(p, q) on the stored teacher rows, pooled per "
        "category.",
        "",
        table(["category", "stream records", "held-out records", "teacher rows", "α̂ untrained", "α̂ global",
               "α̂ per-cluster", "gain (per-cluster − global)", "α̂ per-category (oracle routing)"], rows),
        "",
        f"Aim (issue 5: per-cluster beats global by ≥ {aim['gain_goal']:.2f} mean α̂): {verdict} "
        f"(gain {_f(aim['gain'], '+.3f')}).",
        "",
        f"Router purity against the true categories: stream {_f(r['purity_stream'])} "
        f"({result['prompts']['stream']} prompts), held-out {_f(r['purity_heldout'])} "
        f"({result['prompts']['heldout']} prompts); {len(r['clusters'])} clusters opened.",
        "",
        table(["cluster", "stream records", "stream composition", "held-out composition", "updates / steps",
               "α̂ untrained", "α̂ global", "α̂ own draft"], crow),
        "",
        f"Per-cluster α̂ on the held-out prompts routed to each cluster. "
        f"Wall time {t.get('total_wall', t['total']) / 60:.1f} min "
        f"(records {gen_s}, training global {t['train_global'] / 60:.1f} / per-cluster "
        f"{t['train_per_cluster'] / 60:.1f} / oracle {t['train_oracle'] / 60:.1f} min, scoring "
        f"{t['scoring'] / 60:.1f} min).",
    ])


# --------------------------------------------------------------------------- command line


def add_bench_clusters_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("bench clusters (uses --max-tokens (96), --gamma (record generation only), "
                                  "--quick, --reuse-records, the model args)")
    g.add_argument("--clusters-categories", default=",".join(DEFAULT_CATEGORIES),
                   help="comma-separated Spec-Bench categories mixed into the stream (at least 2)")
    g.add_argument("--clusters-stream", type=int, default=24, help="stream prompts per category (default 24)")
    g.add_argument("--clusters-heldout", type=int, default=8, help="held-out prompts per category (default 8)")
    g.add_argument("--clusters-lr", type=float, default=3e-3, help="distillation lr (default 3e-3)")
    g.add_argument("--clusters-steps", type=int, default=4, help="optimizer steps per update (default 4)")
    g.add_argument("--clusters-update-interval", type=int, default=8, help="records per update (default 8)")
    g.add_argument("--clusters-seed", type=int, default=0, help="stream shuffle seed (default 0)")
    g.add_argument("--clusters-records", default=None,
                   help="records cache (default bench/results/clusters_records.osdr; --quick: clusters_quick_records.osdr)")


def settings_from_args(args: argparse.Namespace) -> ClustersBenchSettings:
    if args.quick:
        return replace(ClustersBenchSettings.quick(), gamma=args.gamma, seed=args.clusters_seed)
    categories = tuple(c.strip() for c in args.clusters_categories.split(",") if c.strip())
    if len(categories) < 2:
        raise ValueError(f"--clusters-categories needs at least 2 categories to mix, got {list(categories)}")
    return ClustersBenchSettings(categories=categories, stream_per_category=args.clusters_stream,
                                 heldout_per_category=args.clusters_heldout, max_tokens=args.max_tokens,
                                 gamma=args.gamma, lr=args.clusters_lr, steps_per_update=args.clusters_steps,
                                 update_interval=args.clusters_update_interval, seed=args.clusters_seed)


def run_clusters_bench_command(args: argparse.Namespace) -> dict:
    from osd.config import ModelConfig
    from osd.data.workloads import chat_prompt_ids, load_questions
    from osd.decoding.engine import build_engine
    from osd.models.drafts import build_self_draft
    from osd.router import Router, RouterConfig, template_affixes

    started = time.perf_counter()
    s = settings_from_args(args)
    stream_rows, held_rows = mixed_stream(load_questions(args.data, list(s.categories)), s.categories,
                                          s.stream_per_category, s.heldout_per_category, s.seed)
    engine = build_engine(ModelConfig(target=args.target, draft="none", device=args.device, dtype=args.dtype,
                                      torch_threads=args.threads), EngineConfig(speculation="always", teacher_top_k=s.teacher_top_k))
    target, tokenizer = engine.target, engine.tokenizer
    base = DraftModel(build_self_draft(target, args.draft_layers)).eval()
    rows = stream_rows + held_rows
    prompts = [chat_prompt_ids(tokenizer, r["turns"][0]) for r in rows]

    out = Path(args.out)
    name = "clusters_quick" if args.quick else "clusters"
    cache = Path(args.clusters_records or out / f"{name}_records.osdr")
    meta = {"target": args.target, "draft_layers": args.draft_layers, "max_tokens": s.max_tokens,
            "top_k": s.teacher_top_k, "question_ids": [r["question_id"] for r in rows]}
    records = gen = None
    if args.reuse_records and cache.exists():
        cached, cached_meta = load_records(cache)
        if {k: cached_meta.get(k) for k in meta} == meta and len(cached) == len(rows):
            records, gen = cached, {**cached_meta.get("generation", {}), "cached": True}
            print(f"[clusters] reusing {len(records)} records from {cache}")
        else:
            print(f"[clusters] {cache} was made for another configuration; regenerating it")
    if records is None:
        print(f"[clusters] the engine (target + untrained draft, γ={s.gamma}) serves {len(rows)} prompts "
              f"({s.max_tokens} tokens, greedy) to make the records")
        start = time.perf_counter()
        records, stats = generate_records(target, tokenizer, base, prompts, s)
        per_cat: dict[str, list[dict]] = {}
        for r, st in zip(rows, stats):
            per_cat.setdefault(r["category"], []).append(st)
        served = {c: (sum(x["beta_sum"] for x in v) / sum(x["beta_count"] for x in v)
                      if sum(x["beta_count"] for x in v) else None) for c, v in per_cat.items()}
        tokens, seconds = sum(x["tokens"] for x in stats), sum(x["seconds"] for x in stats)
        gen = {"cached": False, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
               "served_alpha_hat_untrained": served, "wall_s": time.perf_counter() - start}
        save_records(cache, records, {**meta, "generation": gen})
        print(f"[clusters] records cached at {cache} (reuse with --reuse-records)")
    records_s = time.perf_counter() - started

    n = len(stream_rows)
    router = Router(RouterConfig(num_clusters=len(s.categories)), target.get_input_embeddings().weight,
                    template=template_affixes(tokenizer))
    result = run_clusters_bench(base, records[:n], [r["category"] for r in stream_rows], records[n:],
                                [r["category"] for r in held_rows], router.route, s)
    result["records"] = {**gen, **bytes_per_position(records), "cache": str(cache)}
    result["timings_s"]["records"] = records_s
    result["timings_s"]["total_wall"] = time.perf_counter() - started
    result["environment"] = environment()
    result["config"] = {"target": args.target, "draft_layers": args.draft_layers, "quick": bool(args.quick),
                        "router": router.config.model_dump(),
                        "stream_question_ids": meta["question_ids"][:n], "heldout_question_ids": meta["question_ids"][n:]}
    path = write_json(out, name, result)
    markdown = render_markdown(result)
    print("\n" + markdown)
    if args.quick:
        print(f"\nresults: {path}\n(--quick leaves {args.doc} alone)")
    else:
        print(f"\nresults: {path}\ntable:   {update_doc_section(args.doc, 'clusters', markdown)}")
    return result
