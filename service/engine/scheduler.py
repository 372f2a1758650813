"""The engine's decisions, as pure functions of plain data (no tensors, no threads, no clock).

At every iteration the engine asks: which waiting requests join the running batch now, and which
requests (waiting or running) are dropped because their caller gave up or their deadline passed?

A request's images are admitted all together, never past ``max_rows`` images in flight per model;
models are independent. Within a model, the :class:`Policy` orders admission:

- ``fifo``: first come, first served; when the oldest waiting request does not fit, later ones wait
  behind it (no starvation of large requests).
- ``short-first`` (the default): latency-sensitive requests (at most ``short_work`` model evaluations
  per image) go before bulk ones, each class in arrival order, and a request that does not fit does
  not hold back smaller ones behind it; a request that has waited ``starvation_s`` goes first and
  does hold back the ones behind it, so nothing waits forever. ``reserve_rows`` of every model's
  rows are only for latency-sensitive requests, so one never waits for a full batch of bulk work
  to finish.

The engine also steps a model's latency-sensitive rows in every iteration ahead of bulk ones, and
may cap the rows of an iteration while they are in flight (``Engine(latency_rows=...)``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

ORDERS = ("short-first", "fifo")


@dataclass(frozen=True)
class Ticket:
    """What the scheduler needs to know about one request."""
    key: int
    model: str
    rows: int
    cancelled: bool = False
    expired: bool = False
    work: int = 0  # model evaluations per image (NFE)
    waited_s: float = 0.0

    @property
    def dead(self) -> bool:
        return self.cancelled or self.expired


@dataclass(frozen=True)
class Policy:
    order: str = "short-first"
    short_work: int = 25  # at most this many evaluations per image: latency-sensitive
    reserve_rows: int = 0  # rows per model that only latency-sensitive requests may take
    starvation_s: float = 30.0  # waited this long: first in line, whatever its size

    def __post_init__(self):
        if self.order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {self.order!r}")

    def short(self, t: Ticket) -> bool:
        return t.work <= self.short_work


@dataclass
class Plan:
    admit: list[int] = field(default_factory=list)  # waiting keys to start now, in order
    drop_waiting: list[int] = field(default_factory=list)  # waiting keys to remove (cancelled or expired)
    drop_running: list[int] = field(default_factory=list)  # running keys whose rows leave now


def plan(waiting: Sequence[Ticket], running: Iterable[Ticket], max_rows: int, policy: Policy = Policy()) -> Plan:
    """Decide one iteration's admissions and drops. ``waiting`` is in arrival order; ``running`` are
    the requests in flight."""
    out = Plan()
    rows: dict[str, int] = {}
    for t in running:
        if t.dead:
            out.drop_running.append(t.key)
        else:
            rows[t.model] = rows.get(t.model, 0) + t.rows
    alive = []
    for t in waiting:
        (out.drop_waiting if t.dead else alive).append(t.key if t.dead else t)
    if policy.order == "short-first":  # stable: arrival order within each class
        alive.sort(key=lambda t: (t.waited_s < policy.starvation_s, not policy.short(t)))
    blocked: set[str] = set()
    for t in alive:
        if t.model in blocked:
            continue
        limit = max_rows if policy.short(t) else max_rows - policy.reserve_rows
        if rows.get(t.model, 0) + t.rows <= limit:
            out.admit.append(t.key)
            rows[t.model] = rows.get(t.model, 0) + t.rows
        elif policy.order == "fifo" or t.waited_s >= policy.starvation_s:
            blocked.add(t.model)  # it goes next: nobody overtakes it
    return out
