"""Which query cluster the trainer works on next: fair by backlog.

One trainer serves every cluster's buffer stream. Always taking the biggest backlog is
efficient but starves a small cluster behind a busy one; round-robin ignores that one
cluster may have 20× the traffic. So each cluster's claim is its backlog times an aging
factor that grows with every step it is passed over: a busy cluster gets most steps, and a
cluster with any backlog is served within a bounded number of steps
(``1 / aging`` × its backlog ratio at most).
"""

from __future__ import annotations

from collections.abc import Mapping


class BacklogScheduler:
    """``pick(backlogs)`` -> the cluster to step next (None when nothing waits)."""

    def __init__(self, aging: float = 0.25) -> None:
        if aging <= 0:
            raise ValueError(f"aging must be > 0, got {aging}")
        self.aging = aging
        self.waited: dict[str, int] = {}  # steps each cluster has been passed over while it had a backlog

    def pick(self, backlogs: Mapping[str, int]) -> str | None:
        """``backlogs``: cluster -> records waiting for it (undelivered + held for its next update)."""
        waiting = {c: b for c, b in backlogs.items() if b > 0}
        for c in list(self.waited):
            if c not in waiting:
                del self.waited[c]
        if not waiting:
            return None
        # Sorted first: ties go to the alphabetically first cluster, so the choice is deterministic.
        chosen = max(sorted(waiting), key=lambda c: waiting[c] * (1 + self.aging * self.waited.get(c, 0)))
        for c in waiting:
            self.waited[c] = 0 if c == chosen else self.waited.get(c, 0) + 1
        return chosen
