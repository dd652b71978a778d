"""The query-cluster router: which per-cluster draft serves a prompt (and which buffer stream its record joins).

Each request's prompt token ids become a cheap feature vector, and an online spherical
k-means assigns it a stable cluster id (``c0``, ``c1``, …, never renumbered).

**Features** (``RouterConfig.features``), all unit vectors, all without a model forward:

- ``embedding`` (default): the mean of the target's input embeddings (``[V, d]`` lookup)
  over the prompt's *content* tokens, plus one log-length component.
- ``ngram``: unigram + bigram token ids hashed into ``ngram_buckets`` buckets, sublinear
  tf, plus the log-length component. For targets whose embeddings are not at hand.
- ``both``: the two concatenated (each half unit-norm).

The chat template (system prompt, role markers: 30 of SmolLM2's tokens) is common to every
prompt and drowns a short question's mean. We strip it exactly: ``template_affixes``
renders the template around a marker once, and ``Router(template=...)`` drops that prefix
and suffix wherever a prompt carries them. But the template was also what made the plain
mean encode *length* (how diluted it is), and length is the strongest cheap signal of the
kind of request (a QA question is 10 tokens, a RAG document 1000), so length gets its own
component. The alternatives the brief suggested lost: idf weighting learned online
up-weights rare *topic* words (two news articles look unlike) and down-weights the
instruction words that mark the kind; subtracting a running mean amplified noise dims.

Measured on Spec-Bench with this module (20 shuffled orders, purity mean / worst order, each
variant at its best ``new_cluster_distance``): 5 kinds {translation, summarization,
math_reasoning, qa, coding (MT-bench's 10)}, k = 5:

- embedding, template stripped + length (the default, distance 0.25): 0.961 / 0.93
- embedding, plain mean (template kept, no length, 0.08): 0.844 / 0.62; + length (0.12): 0.930 / 0.72
- embedding, template stripped, no length: 0.66 / 0.48
- ngram, stripped + length (0.4): 0.863 / 0.69; both (0.25): 0.909 / 0.70
- earlier prototype (3–8 orders): online-idf-weighted mean 0.73, running-mean-centred 0.77;
  ngram with idf 0.73 (below ngram without it)

Adding rag (6 kinds, k = 6) gives 0.776 / 0.77 with the default: rag and summarization are
both long documents, 0.01 apart in cosine distance, and merge (which alone caps purity at
0.80). All 13 categories into k = 4: 0.645 / 0.55.

**Clustering.** A point farther than ``new_cluster_distance`` (cosine distance) from every
centroid opens a new cluster while fewer than ``num_clusters`` exist; otherwise the nearest
centroid moves towards it by ``1 / min(n, step_count_cap)`` and is renormalised, so
centroids settle but still follow slow drift.

**Stability.** A prompt's id is remembered under a hash of its token ids, so centroid drift
never moves a known prompt. The memory is bounded (``assignment_cache_size``): in Redis
two generations of hashes; when the newer one holds half the cap a fresh one starts and the
older is dropped (a hit in the older one is copied forward, so it is LRU-ish). The replica
keeps an LRU of the same size in front (in memory mode that LRU is the whole memory).

**Shared state in Redis** (``{prefix}:state`` JSON header, ``{prefix}:centroids`` hash of
raw little-endian float32 rows, ``{prefix}:assign:{gen}`` hashes; never pickle). Every
update is a WATCH/MULTI transaction on the header, so two replicas never lose each other's
update, and a replica re-reads only the centroids whose revision moved past its cached
version. While Redis is unreachable the router answers from its cached state (nearest
centroid, no learning), logs once per outage, retries after ``retry_interval_s``, and on
reconnection writes the ids it gave out meanwhile (unless another replica already assigned
that prompt, whose id then wins here too).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import secrets
import sys
import threading
import time
from array import array
from collections import Counter, OrderedDict
from dataclasses import dataclass, field, replace
from typing import Literal, Sequence

import numpy as np
import redis
import torch
from pydantic import BaseModel, ConfigDict, Field
from redis.backoff import NoBackoff
from redis.retry import Retry

log = logging.getLogger(__name__)

# What route() answers when routing is disabled: serving.DEFAULT_CLUSTER, the draft every
# request uses until per-cluster drafts exist (not imported: serving pulls in the engine).
DISABLED_CLUSTER = "global"
STATE_SCHEMA = 1
_MAX_TRANSACTION_ATTEMPTS = 32  # WATCH conflicts needed to give up on one update
_CONFLICT_BACKOFF_S = (0.001, 0.05)  # first and largest jittered wait after a conflict
_MAX_OFFLINE_PENDING = 10_000  # ids handed out while Redis was down, written back on return
_TEMPLATE_MARKER = "\u2063osd-router-marker\u2063"  # text no real prompt contains


class RouterConfig(BaseModel):
    """How prompts are grouped into query clusters; see the module docstring."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    enabled: bool = Field(True, description="Route by prompt cluster; off sends every request to 'global'.")
    num_clusters: int = Field(4, ge=1, le=256, description="Most clusters ever opened (k); ids are c0..c{k-1}.")
    features: Literal["embedding", "ngram", "both"] = Field(
        "embedding", description="Prompt features: target input-embedding mean, hashed token n-grams, or both.")
    new_cluster_distance: float = Field(
        0.25, gt=0.0, lt=2.0, description="Cosine distance from all centroids beyond which a prompt opens a cluster.")
    length_weight: float = Field(
        1.0, ge=0.0, le=10.0, description="Weight of the log prompt length component (0 ignores length).")
    ngram_buckets: int = Field(
        4096, ge=64, le=1 << 20, description="Hash buckets (feature dims) for unigram+bigram features.")
    step_count_cap: int = Field(
        1000, ge=1, description="Centroids move 1/n towards each new point, but at least 1/step_count_cap.")
    assignment_cache_size: int = Field(
        100_000, ge=2, le=100_000_000, description="Prompts whose cluster id is remembered (Redis and replica LRU).")
    redis_prefix: str = Field(
        "osd:router", min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$",
        description="Prefix of the router's Redis keys; routers sharing it share clusters.")
    # With one immediate retry, a silent (not refusing) Redis costs one route ~2x this, then
    # routes skip Redis for retry_interval_s.
    socket_timeout_s: float = Field(
        0.5, gt=0.0, le=30.0, description="Bound on each Redis command and connect attempt, in seconds.")
    retry_interval_s: float = Field(
        2.0, ge=0.0, le=300.0, description="After a Redis failure, route from the cached state this long, then retry.")


class RouterStateError(RuntimeError):
    """The router state in Redis is unreadable or was built with other feature settings."""


# ---------------------------------------------------------------------------- features

def template_affixes(tokenizer) -> tuple[list[int], list[int]]:
    """(prefix ids, suffix ids) the chat template puts around a single user turn.

    Rendered once around a marker text, the same way ``data.chat_prompt_ids`` renders
    prompts, so ``Router(template=...)`` can strip exactly those tokens.
    """
    from osd.data.workloads import chat_prompt_ids  # local: data is light, but keep import-time minimal

    with_marker = chat_prompt_ids(tokenizer, _TEMPLATE_MARKER)
    marker = tokenizer.encode(_TEMPLATE_MARKER, add_special_tokens=False)
    for i in range(len(with_marker) - len(marker) + 1):
        if with_marker[i:i + len(marker)] == marker:
            return with_marker[:i], with_marker[i + len(marker):]
    # The marker merged with a neighbour token: fall back to the common prefix/suffix of two renders.
    other = chat_prompt_ids(tokenizer, "x")
    p = _common_prefix_len(with_marker, other)
    s = _common_prefix_len(with_marker[::-1], other[::-1])
    return with_marker[:p], with_marker[len(with_marker) - s:]


def _common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def strip_template(prompt_ids: Sequence[int], template: tuple[Sequence[int], Sequence[int]] | None) -> list[int]:
    """The prompt without the template's prefix/suffix where it carries them (never empty)."""
    ids = list(prompt_ids)
    if not template:
        return ids
    prefix, suffix = list(template[0]), list(template[1])
    start = len(prefix) if prefix and ids[:len(prefix)] == prefix else 0
    end = len(ids)
    if suffix and end - len(suffix) >= start and ids[end - len(suffix):] == suffix:
        end -= len(suffix)
    return ids[start:end] or ids  # an empty user turn: the template is all there is


def embedding_mean(content: Sequence[int], embeddings: torch.Tensor) -> torch.Tensor:
    """Unit-norm mean input embedding. embeddings: [V, d] (any device/dtype) → [d] float32 CPU."""
    idx = torch.as_tensor(content, dtype=torch.long, device=embeddings.device)
    v = embeddings.index_select(0, idx).float().mean(0).cpu()
    return _unit(v)


def ngram_vector(content: Sequence[int], buckets: int) -> torch.Tensor:
    """Unit-norm hashed unigram+bigram counts with sublinear tf → [buckets] float32."""
    t = torch.as_tensor(content, dtype=torch.long) % (1 << 24)  # keeps the products below 2^63
    uni = (t * 2_654_435_761) % buckets
    bi = ((t[:-1] * 1_000_003) ^ (t[1:] * 19_260_817 + 7)) % buckets  # order-sensitive, own odd multipliers
    counts = torch.zeros(buckets).index_add_(0, torch.cat([uni, bi]), torch.ones(len(uni) + len(bi)))
    # 1 + log(tf): a token repeated 50 times in a document should not outweigh everything else.
    return _unit(torch.where(counts > 0, 1 + counts.clamp(min=1).log(), counts))


def length_component(n_tokens: int, weight: float) -> float:
    """weight · (ln n − ln 64) / ln 8: 0 at 64 tokens, ±weight per factor of 8."""
    return weight * (math.log(max(n_tokens, 1)) - math.log(64)) / math.log(8)


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm().clamp(min=1e-12)


class FeatureExtractor:
    """prompt ids → unit feature vector [dim] float32 (CPU); pure, same answer on every replica."""

    def __init__(self, config: RouterConfig, embeddings: torch.Tensor | None,
                 template: tuple[Sequence[int], Sequence[int]] | None = None) -> None:
        if config.features in ("embedding", "both"):
            if embeddings is None:
                raise ValueError(f"features={config.features!r} needs the target's input embeddings "
                                 "(target.get_input_embeddings().weight); pass them or use features='ngram'")
            if embeddings.dim() != 2:
                raise ValueError(f"embeddings must be [vocab, hidden], got shape {tuple(embeddings.shape)}")
        self.config = config
        self.embeddings = embeddings.detach() if embeddings is not None else None  # [V, d]
        self.template = (list(template[0]), list(template[1])) if template else None
        base = {"embedding": self._emb_dim, "ngram": config.ngram_buckets,
                "both": self._emb_dim + config.ngram_buckets}[config.features]
        self.dim = base + 1  # + the length component

    @property
    def _emb_dim(self) -> int:
        return int(self.embeddings.shape[1]) if self.embeddings is not None else 0

    def __call__(self, prompt_ids: Sequence[int]) -> torch.Tensor:
        content = strip_template(prompt_ids, self.template)
        kind = self.config.features
        parts = []
        if kind in ("embedding", "both"):
            parts.append(embedding_mean(content, self.embeddings))
        if kind in ("ngram", "both"):
            parts.append(ngram_vector(content, self.config.ngram_buckets))
        base = torch.cat(parts) / math.sqrt(len(parts))  # each half weighs the same
        length = torch.tensor([length_component(len(content), self.config.length_weight)])
        return _unit(torch.cat([base, length]))

    def check_ids(self, prompt_ids: Sequence[int]) -> None:
        if not prompt_ids:
            raise ValueError("prompt_ids is empty: route a prompt with at least one token")
        lo, hi = min(prompt_ids), max(prompt_ids)
        if lo < 0 or (self.embeddings is not None and hi >= self.embeddings.shape[0]):
            vocab = self.embeddings.shape[0] if self.embeddings is not None else "∞"
            raise ValueError(f"prompt token ids must lie in [0, {vocab}); got {lo}..{hi}: "
                             "route ids from the target's own tokenizer")


def prompt_key(prompt_ids: Sequence[int]) -> str:
    """Stable hash of the token ids (int64 little-endian, blake2b-128): the assignment key."""
    arr = array("q", prompt_ids)
    if sys.byteorder != "little":
        arr.byteswap()
    return hashlib.blake2b(arr.tobytes(), digest_size=16).hexdigest()


# ---------------------------------------------------------------------------- clustering

@dataclass(frozen=True)
class ClusterState:
    """One consistent snapshot of the clusters; replaced whole, never mutated."""

    epoch: str  # random per state lineage: a flushed-and-recreated Redis state never looks like ours
    version: int = 0  # bumped by every committed update
    ids: tuple[str, ...] = ()
    counts: tuple[int, ...] = ()
    revs: tuple[int, ...] = ()  # version at which each centroid was last written
    centroids: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0))  # [n_open, dim] float32, unit rows
    gen: int = 0  # assignment-hash generation

    @staticmethod
    def empty(dim: int) -> "ClusterState":
        return ClusterState(epoch=secrets.token_hex(8), centroids=torch.zeros(0, dim))

    def nearest(self, x: torch.Tensor) -> tuple[int, float]:
        """Index of the closest centroid and its cosine distance. x: [dim] unit."""
        sims = self.centroids @ x  # [n_open]
        j = int(sims.argmax())
        return j, 1.0 - float(sims[j])

    def place(self, x: torch.Tensor, config: RouterConfig) -> tuple[int, torch.Tensor]:
        """Where x goes and that centroid's new row. x: [dim] unit → (index, [dim] unit)."""
        if not self.ids:
            return 0, x.clone()
        j, dist = self.nearest(x)
        if dist > config.new_cluster_distance and len(self.ids) < config.num_clusters:
            return len(self.ids), x.clone()
        step = 1.0 / min(self.counts[j] + 1, config.step_count_cap)
        c = self.centroids[j]
        return j, _unit(c + step * (x - c))

    def updated(self, j: int, row: torch.Tensor, gen: int | None = None) -> "ClusterState":
        """The snapshot after centroid j became row ([dim]) and gained one point (j == len opens it)."""
        v = self.version + 1
        if j == len(self.ids):
            return replace(self, version=v, ids=self.ids + (f"c{j}",), counts=self.counts + (1,),
                           revs=self.revs + (v,), centroids=torch.cat([self.centroids, row[None]]),
                           gen=self.gen if gen is None else gen)
        centroids = self.centroids.clone()
        centroids[j] = row
        return replace(self, version=v, counts=_set(self.counts, j, self.counts[j] + 1), revs=_set(self.revs, j, v),
                       centroids=centroids, gen=self.gen if gen is None else gen)


def _set(t: tuple, i: int, value) -> tuple:
    return t[:i] + (value,) + t[i + 1:]


def purity(assignments: list[str], labels: list[str]) -> float:
    """Fraction of points whose cluster's majority label is their own label."""
    if len(assignments) != len(labels):
        raise ValueError(f"{len(assignments)} assignments but {len(labels)} labels")
    if not assignments:
        raise ValueError("purity of nothing: pass at least one assignment")
    by_cluster: dict[str, Counter] = {}
    for a, l in zip(assignments, labels):
        by_cluster.setdefault(a, Counter())[l] += 1
    return sum(c.most_common(1)[0][1] for c in by_cluster.values()) / len(assignments)


# ---------------------------------------------------------------------------- Redis codec

def _row_bytes(row: torch.Tensor) -> bytes:
    """[dim] → raw little-endian float32."""
    return row.detach().cpu().numpy().astype("<f4").tobytes()


def _row_from_bytes(raw: bytes, dim: int) -> torch.Tensor:
    if len(raw) != 4 * dim:
        raise RouterStateError(f"a centroid has {len(raw)} bytes, expected {4 * dim} ({dim} float32)")
    return torch.from_numpy(np.frombuffer(raw, dtype="<f4").astype(np.float32))


def _header(state: ClusterState, features: str, dim: int) -> str:
    return json.dumps({"schema": STATE_SCHEMA, "epoch": state.epoch, "version": state.version,
                       "features": features, "dim": dim, "dtype": "float32-le", "ids": list(state.ids),
                       "counts": list(state.counts), "revs": list(state.revs), "gen": state.gen})


def _parse_header(raw: bytes, features: str, dim: int) -> dict:
    try:
        h = json.loads(raw)
        ok = h["schema"] == STATE_SCHEMA and len(h["ids"]) == len(h["counts"]) == len(h["revs"])
    except (ValueError, KeyError, TypeError) as e:
        raise RouterStateError(f"unreadable router state header: {e}") from e
    if not ok:
        raise RouterStateError(f"router state header has schema {h.get('schema')} or inconsistent lists; "
                               f"this osd reads schema {STATE_SCHEMA}")
    if h["features"] != features or h["dim"] != dim:
        raise RouterStateError(
            f"the router state in Redis uses features={h['features']!r} with {h['dim']} dims, this router "
            f"{features!r} with {dim}: use another redis_prefix, or delete the old keys to start over")
    return h


# ---------------------------------------------------------------------------- router

class _Lru:
    def __init__(self, cap: int) -> None:
        self.cap, self._d = cap, OrderedDict()

    def get(self, key: str) -> str | None:
        value = self._d.get(key)
        if value is not None:
            self._d.move_to_end(key)
        return value

    def put(self, key: str, value: str) -> None:
        self._d[key] = value
        self._d.move_to_end(key)
        while len(self._d) > self.cap:
            self._d.popitem(last=False)

    def clear(self) -> None:
        self._d.clear()

    def __len__(self) -> int:
        return len(self._d)


class Router:
    """Gives each prompt a stable query-cluster id; thread-safe; see the module docstring.

    ``Router(config, embeddings, redis_url)``: embeddings [V, d] are the target's input
    embeddings (needed for features 'embedding'/'both'); without ``redis_url`` the state lives
    in this process only. ``template`` = ``template_affixes(tokenizer)`` strips the chat
    template before computing features (measured: it matters; see the module docstring).
    """

    def __init__(self, config: RouterConfig | None = None, embeddings: torch.Tensor | None = None,
                 redis_url: str | None = None, *, template: tuple[Sequence[int], Sequence[int]] | None = None) -> None:
        self.config = config or RouterConfig()
        self.features = FeatureExtractor(self.config, embeddings, template)
        self._state = ClusterState.empty(self.features.dim)
        self._local = _Lru(self.config.assignment_cache_size)  # in memory mode: *the* assignment memory
        self._offline: OrderedDict[str, str] = OrderedDict()  # ids given out while Redis was down
        self._lock = threading.Lock()  # one route at a time: the state cache and the LRU are shared
        self._down_until = 0.0
        self._down = False
        self.offline_routes = 0
        self.conflicts = 0  # transactions redone because another replica committed first
        self._redis = self._connect(redis_url) if redis_url else None
        if self._redis is not None:
            self._initial_load()

    # -- public API

    def route(self, prompt_ids: list[int]) -> str:
        """Cluster id for a prompt (token ids, chat template included); the same prompt always gets the same id."""
        if not self.config.enabled:
            return DISABLED_CLUSTER
        self.features.check_ids(prompt_ids)
        key = prompt_key(prompt_ids)
        with self._lock:
            cid = self._local.get(key)
            if cid is None:
                cid = self._route_redis(key, prompt_ids) if self._redis else self._route_memory(prompt_ids)
                self._local.put(key, cid)
            return cid

    def clusters(self) -> list[str]:
        """Ids of the clusters opened so far (Redis's view when reachable, else the cached one)."""
        with self._lock:
            self._try_refresh()
            return list(self._state.ids)

    def stats(self) -> dict:
        """{'points': {id: prompts assigned}, 'version', 'backend', 'redis_up', 'offline_routes', 'conflicts',
        'cached_assignments'}."""
        with self._lock:
            self._try_refresh()
            s = self._state
            return {"points": dict(zip(s.ids, s.counts)), "version": s.version,
                    "backend": "redis" if self._redis else "memory",
                    "redis_up": self._redis is not None and not self._down,
                    "offline_routes": self.offline_routes, "conflicts": self.conflicts,
                    "cached_assignments": len(self._local)}

    def close(self) -> None:
        if self._redis is not None:
            self._redis.close()

    def __enter__(self) -> "Router":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- in-memory

    def _route_memory(self, prompt_ids: Sequence[int]) -> str:
        j, row = self._state.place(self.features(prompt_ids), self.config)
        self._state = self._state.updated(j, row)
        return self._state.ids[j]

    # -- Redis

    def _connect(self, url: str) -> redis.Redis:
        t = self.config.socket_timeout_s
        # One immediate retry reconnects a pooled connection after a server restart; the
        # default policy would back off for seconds on a dead server.
        return redis.Redis.from_url(url, protocol=2, socket_timeout=t, socket_connect_timeout=t,
                                    retry=Retry(NoBackoff(), 1))

    @property
    def _k_state(self) -> str:
        return f"{self.config.redis_prefix}:state"

    @property
    def _k_centroids(self) -> str:
        return f"{self.config.redis_prefix}:centroids"

    def _k_assign(self, gen: int) -> str:
        return f"{self.config.redis_prefix}:assign:{gen}"

    def _initial_load(self) -> None:
        try:
            self._refresh(self._redis)
        except RouterStateError as e:
            raise ValueError(str(e)) from e  # a misconfiguration: refuse to start
        except redis.RedisError as e:
            self._mark_down(e)

    def _try_refresh(self) -> None:
        if self._redis is None or time.monotonic() < self._down_until:
            return
        try:
            self._refresh(self._redis)
            self._mark_up()
        except (redis.RedisError, RouterStateError) as e:
            self._mark_down(e)

    def _route_redis(self, key: str, prompt_ids: Sequence[int]) -> str:
        if time.monotonic() < self._down_until:
            return self._route_offline(key, prompt_ids)
        try:
            self._flush_offline()
            cid = self._transact(key, prompt_ids)
        except (redis.RedisError, RouterStateError) as e:
            self._mark_down(e)
            return self._route_offline(key, prompt_ids)
        self._mark_up()
        return cid if cid is not None else self._route_offline(key, prompt_ids)

    def _refresh(self, client) -> ClusterState:
        """Bring the cached snapshot up to Redis's (client: the Redis client or a WATCHing pipeline)."""
        raw = client.get(self._k_state)
        cached = self._state
        if raw is None:
            if cached.ids:  # flushed, or a fresh server without our data: Redis is the truth
                log.warning("router state vanished from Redis (%s); starting clusters over", self._k_state)
                self._local.clear()
            self._state = ClusterState.empty(self.features.dim) if cached.ids else cached
            return self._state
        h = _parse_header(raw, self.config.features, self.features.dim)
        if h["epoch"] == cached.epoch and h["version"] == cached.version:
            return cached
        # A lower version in the same lineage: Redis lost recent writes (AOF fsync window); reload all.
        same_lineage = h["epoch"] == cached.epoch and h["version"] >= cached.version
        if h["epoch"] != cached.epoch:
            self._local.clear()  # assignments of another lineage mean nothing here
        stale = [i for i, rev in enumerate(h["revs"])
                 if not same_lineage or i >= len(cached.ids) or rev > cached.version]
        rows = client.hmget(self._k_centroids, [h["ids"][i] for i in stale]) if stale else []
        centroids = torch.zeros(len(h["ids"]), self.features.dim)
        if same_lineage and cached.ids:
            centroids[:len(cached.ids)] = cached.centroids
        for i, raw_row in zip(stale, rows):
            if raw_row is None:
                raise RouterStateError(f"centroid {h['ids'][i]} is missing from {self._k_centroids}")
            centroids[i] = _row_from_bytes(raw_row, self.features.dim)
        self._state = ClusterState(epoch=h["epoch"], version=h["version"], ids=tuple(h["ids"]),
                                   counts=tuple(h["counts"]), revs=tuple(h["revs"]), centroids=centroids, gen=h["gen"])
        return self._state

    def _lookup(self, client, state: ClusterState, key: str) -> tuple[str | None, bool]:
        """(assigned id or None, whether it is in the current generation)."""
        current = client.hget(self._k_assign(state.gen), key)
        if current is not None:
            return current.decode(), True
        previous = client.hget(self._k_assign(state.gen - 1), key) if state.gen > 0 else None
        return (previous.decode() if previous is not None else None), False

    def _transact(self, key: str, prompt_ids: Sequence[int]) -> str | None:
        """Assign (and learn from) a prompt in one optimistic transaction; None after too many conflicts."""
        x = None
        for attempt in range(_MAX_TRANSACTION_ATTEMPTS):
            with self._redis.pipeline(transaction=True) as pipe:
                try:
                    pipe.watch(self._k_state)  # every committed update rewrites the header
                    state = self._refresh(pipe)
                    cid, in_current = self._lookup(pipe, state, key)
                    if cid is not None and in_current:
                        return cid
                    filled = pipe.hlen(self._k_assign(state.gen))  # read before MULTI: queued replies come too late
                    pipe.multi()
                    if cid is not None:  # copy forward so the next rotation keeps it
                        pipe.hsetnx(self._k_assign(state.gen), key, cid)
                        pipe.execute()
                        return cid
                    x = self.features(prompt_ids) if x is None else x
                    new, j = self._queue_update(pipe, state, key, x, filled)
                    pipe.execute()
                except redis.WatchError:
                    self.conflicts += 1
                    # Another replica committed first: re-read and redo on its state. A jittered,
                    # growing wait keeps two busy replicas from colliding in lockstep (on a loaded
                    # 2-core machine one was starved past 32 attempts without it).
                    first, largest = _CONFLICT_BACKOFF_S
                    time.sleep(random.uniform(0, min(largest, first * 2 ** attempt)))
                    continue
            self._state = new
            return new.ids[j]
        log.warning("router: %d update conflicts in a row; routing this prompt from the cached state",
                    _MAX_TRANSACTION_ATTEMPTS)
        return None

    def _queue_update(self, pipe, state: ClusterState, key: str, x: torch.Tensor,
                      filled: int) -> tuple[ClusterState, int]:
        """Queue the centroid, header and assignment writes for x ([dim]); return the snapshot they make and x's index.

        filled: entries in the current assignment generation; at half the cap a new one starts.
        """
        j, row = state.place(x, self.config)
        gen = state.gen
        if filled + 1 > self.config.assignment_cache_size // 2:
            gen += 1  # rotate: the new generation starts empty, the one before the old drops
            pipe.delete(self._k_assign(gen - 2))
        new = state.updated(j, row, gen=gen)
        pipe.hset(self._k_centroids, new.ids[j], _row_bytes(row))
        pipe.hset(self._k_assign(gen), key, new.ids[j])
        pipe.set(self._k_state, _header(new, self.config.features, self.features.dim))
        return new, j

    # -- Redis down

    def _route_offline(self, key: str, prompt_ids: Sequence[int]) -> str:
        """Nearest cached centroid, no learning; 'c0' (the first id any router opens) before any state."""
        self.offline_routes += 1
        state = self._state
        cid = state.ids[state.nearest(self.features(prompt_ids))[0]] if state.ids else "c0"
        self._offline[key] = cid
        while len(self._offline) > _MAX_OFFLINE_PENDING:
            self._offline.popitem(last=False)
        return cid

    def _flush_offline(self) -> None:
        """Write the ids handed out while Redis was down; where another replica assigned one first, adopt its id."""
        if not self._offline:
            return
        gen = self._refresh(self._redis).gen
        items = list(self._offline.items())
        pipe = self._redis.pipeline(transaction=False)
        for key, cid in items:
            pipe.hsetnx(self._k_assign(gen), key, cid)
            pipe.hget(self._k_assign(gen), key)
        replies = pipe.execute()
        for (key, _), winner in zip(items, replies[1::2]):
            if winner is not None:
                self._local.put(key, winner.decode())
            self._offline.pop(key, None)

    def _mark_down(self, error: Exception) -> None:
        self._down_until = time.monotonic() + self.config.retry_interval_s
        if not self._down:
            self._down = True
            log.warning("router: Redis unreachable or unusable (%s); routing from the cached state (%d clusters) "
                        "and retrying every %.1f s", error, len(self._state.ids), self.config.retry_interval_s)

    def _mark_up(self) -> None:
        if self._down:
            self._down = False
            log.warning("router: Redis reachable again; %d offline routes so far", self.offline_routes)
