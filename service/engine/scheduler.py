"""The engine's decisions, as pure functions of plain data (no tensors, no threads, no clock).

At every iteration the engine asks: which waiting requests join the running batch now, and which
requests (waiting or running) are dropped because their caller gave up or their deadline passed?

Admission is first-come first-served per model, a request's images all together, and never past
``max_rows`` images in flight per model. When the oldest waiting request of a model does not fit,
later ones of that model wait behind it (no starvation of large requests); other models go on.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Ticket:
    """What the scheduler needs to know about one request."""
    key: int
    model: str
    rows: int
    cancelled: bool = False
    expired: bool = False

    @property
    def dead(self) -> bool:
        return self.cancelled or self.expired


@dataclass
class Plan:
    admit: list[int] = field(default_factory=list)  # waiting keys to start now, in order
    drop_waiting: list[int] = field(default_factory=list)  # waiting keys to remove (cancelled or expired)
    drop_running: list[int] = field(default_factory=list)  # running keys whose rows leave now


def plan(waiting: Sequence[Ticket], running: Iterable[Ticket], max_rows: int) -> Plan:
    """Decide one iteration's admissions and drops. ``running`` are the requests in flight."""
    out = Plan()
    rows: dict[str, int] = {}
    for t in running:
        if t.dead:
            out.drop_running.append(t.key)
        else:
            rows[t.model] = rows.get(t.model, 0) + t.rows
    blocked: set[str] = set()
    for t in waiting:
        if t.dead:
            out.drop_waiting.append(t.key)
            continue
        if t.model in blocked:
            continue
        if rows.get(t.model, 0) + t.rows <= max_rows:
            out.admit.append(t.key)
            rows[t.model] = rows.get(t.model, 0) + t.rows
        else:
            blocked.add(t.model)
    return out

