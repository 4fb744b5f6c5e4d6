"""The little the engine needs from whoever runs it: who am I, where do I compute, report.

The engine never imports Ray. `segjob.cluster.worker.RaySession` implements this on Ray Train;
`LocalSession` runs the same loop in one plain process (tests, debugging, benchmarks).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from segjob.engine.preemption.notice import Notice


class Session(Protocol):
    rank: int
    world_size: int
    device: torch.device

    def report(self, metrics: dict[str, Any], checkpoint_path: str | None) -> None:
        """Called by every rank the same number of times; checkpoint_path is rank 0's committed folder."""

    def preemption_info(self) -> Notice | None:
        """A drain for preemption of any node of the group, as the cluster sees it; the same on every rank.
        A barrier: every rank calls it at the same step, from the training thread."""

    def drain(self, notice: Notice) -> bool:
        """Ask the cluster to drain this node for preemption by the notice's deadline (from a side
        thread, at most once); False when there is nothing to drain."""


class LocalSession:
    """One process, no Ray: rank 0 of 1. Keeps what was reported, for callers to inspect."""

    def __init__(self, device: str | torch.device | None = None):
        self.rank = 0
        self.world_size = 1
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.reports: list[tuple[dict[str, Any], str | None]] = []

    def report(self, metrics: dict[str, Any], checkpoint_path: str | None) -> None:
        self.reports.append((dict(metrics), checkpoint_path))

    def preemption_info(self) -> Notice | None:
        return None

    def drain(self, notice: Notice) -> bool:
        return False  # no cluster: the notice only makes the loop checkpoint
