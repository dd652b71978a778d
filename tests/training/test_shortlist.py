"""The shortlist head grown from traffic: tally, adoption rule, and the trip trainer → registry → replica."""

from __future__ import annotations

import pytest
import torch
from support.tiny import CharTokenizer, tiny_llama

from osd.config import EngineConfig
from osd.data.records import TrainingRecord
from osd.decoding.engine import SpeculativeEngine
from osd.models.drafts import (
    SHORTLIST_KEY,
    DraftModel,
    load_published_state,
    published_specs,
)
from osd.registry import DraftMismatchError, DraftRegistry, FileStore
from osd.serving.core import ServingCore
from trainers.config import DistillConfig
from trainers.distiller import OnlineDistiller
from trainers.shortlist import TokenTally, coverage, grown_shortlist

V = 64


def record(output: list[int], teacher: list[list[tuple[int, float]]], prompt: list[int] | None = None) -> TrainingRecord:
    """teacher: per emitted position, its (token id, probability) top-k entries."""
    ids = torch.tensor([[t for t, _ in row] for row in teacher], dtype=torch.int32)
    logprobs = torch.tensor([[p for _, p in row] for row in teacher]).log().half()
    return TrainingRecord(prompt or [1, 2, 3], output, ids, logprobs, torch.zeros(len(output)))


def test_tally_ranks_ids_by_target_mass_and_fills_with_low_ids():
    tally = TokenTally(8)
    tally.add(record([5, 6], [[(5, 0.5), (7, 0.5)], [(6, 0.75), (7, 0.25)]]))
    # mass: 5 → 1 + 0.5, 6 → 1 + 0.75, 7 → 0.5 + 0.25 (float16 logprobs round-trip these exactly)
    assert tally.mass[[5, 6, 7]].tolist() == pytest.approx([1.5, 1.75, 0.75], abs=1e-3)
    assert tally.shortlist(2).tolist() == [5, 6]
    assert tally.shortlist(4).tolist() == [0, 5, 6, 7]  # one id short: the lowest unseen fills up
    assert tally.shortlist(100).numel() == 8


def test_coverage_counts_emitted_tokens_inside():
    recs = [record([1, 2, 3, 4], [[(t, 1.0)] for t in (1, 2, 3, 4)])]
    assert coverage(torch.tensor([1, 2, 9]), recs) == 0.5
    assert coverage(None, recs) == 1.0 and coverage(torch.tensor([1]), []) == 1.0


def test_a_grown_shortlist_is_adopted_only_when_it_covers_enough_and_no_less_than_the_current():
    tally = TokenTally(16)
    tally.add([record([t], [[(t, 1.0)]]) for t in (1, 1, 2, 2, 3)])
    holdout = [record([1, 2, 3, 4], [[(t, 1.0)] for t in (1, 2, 3, 4)])]
    assert grown_shortlist(tally, None, holdout, size=3, min_coverage=0.9) is None  # 3 of 4 held-out tokens
    assert grown_shortlist(tally, None, holdout, size=3, min_coverage=0.75).tolist() == [1, 2, 3]
    wider = torch.tensor([1, 2, 3, 4])
    assert grown_shortlist(tally, wider, holdout, size=3, min_coverage=0.5) is wider  # it would cover less
    assert grown_shortlist(tally, None, holdout, size=16, min_coverage=0.0) is None  # the full vocabulary
    assert grown_shortlist(tally, None, [], size=3, min_coverage=0.0) is None  # nothing to measure it on


def domain_records(n: int, seed: int) -> list[TrainingRecord]:
    """Traffic that only ever emits ids 8..23: a 16-token shortlist covers all of it."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        output = (torch.randint(8, 24, (6,), generator=g)).tolist()
        teacher = [[(t, 0.7), (8 + (t - 7) % 16, 0.2), (8 + (t - 6) % 16, 0.1)] for t in output]
        out.append(record(output, teacher, prompt=torch.randint(8, 24, (4,), generator=g).tolist()))
    return out


@pytest.fixture
def trained():
    """A distiller after one update on domain traffic, growing a 16-id shortlist over a 64-token vocabulary."""
    target = tiny_llama(V, 2, seed=0, sharpness=5.0)
    draft = DraftModel(tiny_llama(V, 1, seed=1, sharpness=5.0))
    distiller = OnlineDistiller(draft, DistillConfig(update_interval=8, holdout_fraction=0.2, shortlist_size=16))
    results = distiller.add(domain_records(10, seed=0))
    return target, draft, distiller, results


def test_the_distiller_grows_a_shortlist_and_publishes_it_with_the_weights(trained):
    _, draft, distiller, results = trained
    assert len(results) == 1 and results[0].shortlist_size == 16
    assert distiller.draft.shortlist.tolist() == list(range(8, 24))
    candidate = distiller.candidate()
    assert candidate.shortlist.tolist() == list(range(8, 24))
    logits = candidate(torch.tensor([[8, 9, 10]]))  # [1, 3, V]: -inf outside the shortlist
    assert torch.isinf(logits[..., :8]).all() and torch.isfinite(logits[..., 8:24]).all()
    state = distiller.export_state_dict()
    assert state[SHORTLIST_KEY].tolist() == list(range(8, 24))
    # the served draft (full head as built) loads it: same weights, the grown shortlist
    served = load_published_state(draft, state)
    assert served.shortlist.tolist() == list(range(8, 24)) and draft.shortlist is None


def test_a_replica_serves_the_published_shortlist_and_refuses_a_bad_one(trained, tmp_path):
    target, draft, distiller, _ = trained
    registry = DraftRegistry(FileStore(tmp_path))
    engine = SpeculativeEngine(target, CharTokenizer(), draft, EngineConfig(speculation="always", gamma=3))
    core = ServingCore(engine, "tiny", registry=registry)
    registry.publish("global", distiller.export_state_dict())
    live = core.sync_from_registry()
    assert live.version == 1 and live.draft.shortlist.tolist() == list(range(8, 24))
    # a restarted trainer starts from the live version, shortlist included
    template_specs = published_specs(draft, registry.live("global").tensors)
    restarted = OnlineDistiller(load_published_state(draft, registry.load_validated("global", 1, template_specs)))
    assert restarted.draft.shortlist.tolist() == list(range(8, 24))
    # ids outside the vocabulary: the replica keeps v1
    bad = distiller.export_state_dict() | {SHORTLIST_KEY: torch.tensor([3, V + 5])}
    registry.publish("global", bad)
    with pytest.raises(DraftMismatchError, match="shortlist"):
        core.sync_from_registry()
    assert core.live_draft("global").version == 1
    out = core.complete({"prompt": [8, 9, 10], "max_tokens": 8, "temperature": 0})
    assert out["osd"]["draft_version"] == 1
