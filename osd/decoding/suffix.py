"""Suffix speculation: propose continuations of the context from what the service has already seen.

Two indexes feed one round (SuffixDecoding, Oliaro et al. 2024; prompt lookup):

- the *request* index, over the request's own prompt and output so far (summaries, RAG
  answers and code edits copy their input);
- the *traffic* index of the request's cluster, over recent requests' outputs, each
  preceded by the last few prompt tokens so a repeated or templated request matches from
  its first output token. Bounded by a FIFO of requests and of tokens (`SuffixConfig`).

An index maps every n-gram (n ≤ `max_ngram`) to the positions right after its
occurrences. A lookup takes the longest n-gram ending the context that occurred with a
continuation, and builds a trie of the continuations at its `max_matches` most recent
occurrences. Each trie node carries the fraction of the matches through its parent that
continue with its token; the engine's calibration turns that fraction and the match length
into an estimated acceptance probability. Proposals are deterministic, so the tree rules
treat them as point masses (osd/decoding/tree.py): lossless under greedy and sampling.

Pure Python over token ids; the tree engine merges the trie with the draft's candidates.
"""

from __future__ import annotations

import threading
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from osd.config import SuffixConfig
from osd.decoding.calibration import AcceptanceCalibration

SEPARATOR = -1  # between sequences in an index; never a token, so no n-gram or continuation crosses it


@dataclass(frozen=True)
class Match:
    """What one lookup found: continuations after the longest matching n-gram."""

    length: int  # n of the matched n-gram (0: no match)
    continuations: list[list[int]]  # most recent first, each 1..max_depth tokens

    def trie(self) -> dict[tuple[int, ...], float]:
        """Every continuation prefix → fraction of the matches through its parent that continue with it."""
        counts = Counter(tuple(c[:d]) for c in self.continuations for d in range(1, len(c) + 1))
        total = len(self.continuations)
        return {path: n / (counts[path[:-1]] if len(path) > 1 else total) for path, n in counts.items()}


class SuffixIndex:
    """n-gram → positions-after index over a FIFO window of token sequences. Thread-safe.

    Tokens live in one flat list with SEPARATOR between sequences; a position is global
    (it keeps counting as old sequences are evicted from the front), so the positions
    listed under an n-gram ascend and the evicted ones are a prefix, dropped lazily.
    """

    def __init__(self, max_ngram: int = 4, max_tokens: int | None = None, max_sequences: int | None = None):
        if max_ngram < 1:
            raise ValueError("max_ngram must be >= 1")
        self.max_ngram = max_ngram
        self.max_tokens = max_tokens
        self.max_sequences = max_sequences
        self._tokens: list[int] = []  # the live window
        self._base = 0  # global position of _tokens[0]
        self._starts: deque[int] = deque()  # global position where each live sequence starts
        self._table: dict[tuple[int, ...], list[int]] = {}
        self._entries = 0  # positions listed in _table, stale ones included
        self._lock = threading.Lock()

    @property
    def num_tokens(self) -> int:
        """Live tokens (separators excluded)."""
        return len(self._tokens) - max(0, len(self._starts) - 1)

    @property
    def num_sequences(self) -> int:
        return len(self._starts)

    @property
    def num_entries(self) -> int:
        """Positions held in the n-gram table (the memory that grows with the window)."""
        return self._entries

    def add(self, tokens: Sequence[int]) -> None:
        """Start a new sequence with `tokens`, then evict the oldest sequences past the bounds."""
        with self._lock:
            if self._starts:
                self._append(SEPARATOR)
            self._starts.append(self._base + len(self._tokens))
            for t in tokens:
                self._append(int(t))
            self._evict()

    def extend(self, tokens: Iterable[int]) -> None:
        """Append to the newest sequence (a request's output as it is generated)."""
        with self._lock:
            if not self._starts:
                self._starts.append(self._base)
            for t in tokens:
                self._append(int(t))
            self._evict()

    def match(self, context: Sequence[int], max_depth: int, max_matches: int = 16) -> Match:
        """The continuations after the longest n-gram ending `context` that has any (most recent first)."""
        with self._lock:
            end = self._base + len(self._tokens)
            for n in range(min(self.max_ngram, len(context)), 0, -1):
                positions = self._table.get(tuple(context[-n:]))
                found: list[list[int]] = []
                for pos in reversed(positions or ()):
                    if pos < self._base:
                        break  # evicted, and so is everything listed before it
                    if pos < end:
                        cont = self._continuation(pos - self._base, max_depth)
                        if cont:
                            found.append(cont)
                            if len(found) == max_matches:
                                break
                if found:
                    return Match(n, found)
            return Match(0, [])

    def _continuation(self, i: int, max_depth: int) -> list[int]:
        cont = self._tokens[i : i + max_depth]
        return cont[: cont.index(SEPARATOR)] if SEPARATOR in cont else cont

    def _append(self, token: int) -> None:
        self._tokens.append(token)
        i = len(self._tokens) - 1
        if token == SEPARATOR:
            return
        after = self._base + i + 1  # the position right after this token
        for n in range(1, self.max_ngram + 1):
            if i - n + 1 < 0 or self._tokens[i - n + 1] == SEPARATOR:
                break  # longer n-grams would reach past the sequence start too
            self._table.setdefault(tuple(self._tokens[i - n + 1 : i + 1]), []).append(after)
            self._entries += 1

    def _evict(self) -> None:
        evicted = False
        while len(self._starts) > 1 and (
            (self.max_tokens is not None and self.num_tokens > self.max_tokens)
            or (self.max_sequences is not None and len(self._starts) > self.max_sequences)
        ):
            self._starts.popleft()
            cut = self._starts[0] - self._base  # the next sequence's start: drop its separator too
            del self._tokens[:cut]
            self._base += cut
            evicted = True
        if len(self._starts) == 1 and self.max_tokens is not None and self.num_tokens > self.max_tokens:
            cut = self.num_tokens - self.max_tokens  # one sequence longer than the window: keep its tail
            del self._tokens[:cut]
            self._base += cut
            self._starts[0] = self._base
            evicted = True
        if evicted and self._entries > 2 * self.max_ngram * max(1, len(self._tokens)):
            self._compact()

    def _compact(self) -> None:
        """Drop evicted positions, so the table stays within 2 · max_ngram entries per live token."""
        table, entries = {}, 0
        for key, positions in self._table.items():
            live = [p for p in positions if p - len(key) >= self._base]  # the whole n-gram is still live
            if live:
                table[key] = live
                entries += len(live)
        self._table, self._entries = table, entries


def traffic_sequence(prompt_ids: Sequence[int], output_ids: Sequence[int], max_ngram: int) -> list[int]:
    """What the traffic index keeps of a request: the prompt's last max_ngram tokens, then the output."""
    return [*prompt_ids[-max_ngram:], *output_ids]


class TrafficIndex:
    """One bounded SuffixIndex per cluster over recent requests; dedupes by request id.

    Fed by the replica's own requests as they finish and by every replica's records read
    from the buffer (osd/data/traffic_feed.py), so a replica learns from all traffic.
    """

    def __init__(self, config: SuffixConfig):
        self.config = config
        self._indexes: dict[str, SuffixIndex] = {}
        self._seen: deque[str] = deque(maxlen=4 * config.cluster_requests)
        self._seen_set: set[str] = set()
        self._lock = threading.Lock()

    def add(self, prompt_ids: Sequence[int], output_ids: Sequence[int], cluster: str, request_id: str | None = None) -> bool:
        """Fold one finished request in; False if `request_id` was already folded in."""
        if not output_ids:
            return False
        with self._lock:
            if request_id is not None:
                if request_id in self._seen_set:
                    return False
                if len(self._seen) == self._seen.maxlen:
                    self._seen_set.discard(self._seen[0])
                self._seen.append(request_id)
                self._seen_set.add(request_id)
            index = self._indexes.get(cluster)
            if index is None:
                c = self.config
                index = self._indexes[cluster] = SuffixIndex(c.max_ngram, c.cluster_tokens, c.cluster_requests)
        index.add(traffic_sequence(prompt_ids, output_ids, self.config.max_ngram))
        return True

    def get(self, cluster: str) -> SuffixIndex | None:
        with self._lock:
            return self._indexes.get(cluster)

    def stats(self) -> dict[str, dict[str, int]]:
        with self._lock:
            indexes = sorted(self._indexes.items())
        return {c: {"tokens": i.num_tokens, "requests": i.num_sequences, "entries": i.num_entries} for c, i in indexes}


@dataclass(frozen=True)
class Candidate:
    """One proposed continuation prefix from an index, ready to become a tree node."""

    path: tuple[int, ...]  # tokens after the context; the node's token is path[-1]
    score: float  # estimated P(the whole path is accepted): the product of calibrated steps
    fraction: float  # matches through the parent that continue with this token
    key: tuple[str, int]  # calibration key: (which index, match length)


class SuffixProposer:
    """One request's lookups: its own index (prompt + output so far) and its cluster's traffic index.

    `calibrations` maps (index, match length) to an AcceptanceCalibration of the match
    fraction; the engine keeps them across requests, like the draft's calibration.
    """

    def __init__(self, config: SuffixConfig, prompt_ids: Sequence[int], traffic: SuffixIndex | None,
                 calibrations: dict[tuple[str, int], AcceptanceCalibration]):
        self.config = config
        self.request = SuffixIndex(config.max_ngram)
        self.request.add(prompt_ids)
        self._indexed = len(prompt_ids)
        self.traffic = traffic if config.traffic else None
        self.calibrations = calibrations

    def candidates(self, tokens: Sequence[int], max_depth: int) -> list[Candidate]:
        """tokens: every committed token → candidates, parents before children, at most one per path."""
        self.request.extend(tokens[self._indexed :])
        self._indexed = len(tokens)
        depth = min(max_depth, self.config.max_depth)
        best: dict[tuple[int, ...], Candidate] = {}
        for name, index in (("request", self.request), ("traffic", self.traffic)):
            if index is None:
                continue
            found = index.match(tokens, depth, self.config.max_matches)
            if not found.length:
                continue
            trie = found.trie()
            paths = sorted(trie, key=len)  # parents first
            key = (name, found.length)
            steps = self._calibration(key)(torch.tensor([trie[p] for p in paths], dtype=torch.float64)).tolist()
            scores: dict[tuple[int, ...], float] = {}
            for path, step in zip(paths, steps):
                scores[path] = (scores[path[:-1]] if len(path) > 1 else 1.0) * step
                if path not in best or scores[path] > best[path].score:
                    best[path] = Candidate(path, scores[path], trie[path], key)
        return sorted(best.values(), key=lambda c: len(c.path))

    def observe(self, tried: Sequence[tuple[Candidate, bool]]) -> None:
        """Verification outcomes of tried index candidates, to calibrate the next rounds' scores."""
        by_key: dict[tuple[str, int], list[tuple[float, bool]]] = {}
        for cand, hit in tried:
            by_key.setdefault(cand.key, []).append((cand.fraction, hit))
        for key, rows in by_key.items():
            fractions, hits = zip(*rows)
            self._calibration(key).update(torch.tensor(fractions, dtype=torch.float64), torch.tensor(hits))

    def _calibration(self, key: tuple[str, int]) -> AcceptanceCalibration:
        if key not in self.calibrations:
            # A lone short match is a weak signal: start from half the match fraction, lightly held.
            self.calibrations[key] = AcceptanceCalibration(prior=2.0, prior_scale=min(1.0, 0.25 * (1 + key[1])))
        return self.calibrations[key]
