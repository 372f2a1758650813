"""The engine's decisions, as pure functions of plain data (no tensors, no threads, no clock).

At every iteration the engine asks: which waiting requests join the running batch now, and which
requests (waiting or running) are dropped because their caller gave up or their deadline passed?

A request's images are admitted all together, never past ``max_rows`` images in flight per model
(whatever their image sizes); models are independent. Within a model, the :class:`Policy` orders admission:

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

**Goodput** (``Policy.goodput``, on by default; it needs a :class:`~service.engine.costs.CostModel`
that has measured the model): a request is worth its rows only if it is answered by its deadline.
So, on top of the above:

- waiting requests with a deadline go before those without one, earliest deadline first within
  each latency class (arrival order breaks ties; the starvation bound still comes first);
- a waiting request is admitted only when, with its rows added, the predicted engine iteration is
  short enough that it AND every running request with a deadline still finish by their deadlines
  (predicted finish × ``margin``); a running request already predicted late does not block others;
- a model's rows stay within the cost model's knee (the network rows past which more rows stop
  raising images/s), unless the model has nothing else in flight;
- a request that cannot meet its deadline even if admitted now (its earliest predicted finish:
  beside what runs, or after what runs and what waits ahead of it, whichever is sooner, times
  ``margin``, is past its deadline) is refused at once, with a retry delay from the predicted
  backlog, rather than accepted and then timed out; one that still can waits;
- requests without a deadline (bulk work) fill what deadline work leaves: they are ordered last,
  and deadline requests are admitted as if they were not there (the engine steps bulk rows only
  within the knee while deadline rows are in flight: they yield).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from service.engine.costs import CostModel

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
    deadline_s: float | None = None  # seconds left until its deadline; None: no deadline (bulk work)
    batch: str | None = None  # the engine batch it runs in (its model at one image size; default: model)
    remaining: int | None = None  # evaluations per image still to make (default: work)
    net_rows: int | None = None  # rows of the forward pass (a guided image counts twice; default: rows)

    @property
    def dead(self) -> bool:
        return self.cancelled or self.expired

    @property
    def left(self) -> int:
        return self.work if self.remaining is None else self.remaining

    @property
    def network(self) -> int:
        return self.rows if self.net_rows is None else self.net_rows

    @property
    def cost_key(self) -> str:
        return self.batch or self.model


@dataclass(frozen=True)
class Policy:
    order: str = "short-first"
    short_work: int = 25  # at most this many evaluations per image: latency-sensitive
    reserve_rows: int = 0  # rows per model that only latency-sensitive requests may take
    starvation_s: float = 30.0  # waited this long: first in line, whatever its size
    goodput: bool = True  # admit by predicted finish against deadlines (needs a measured cost model)
    margin: float = 1.1  # a predicted finish times this must be within the deadline to admit

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
    refuse: list[tuple[int, float, float]] = field(default_factory=list)  # (waiting key, predicted s, retry s)
    predicted: dict[int, float] = field(default_factory=dict)  # admitted key -> predicted seconds to finish


def plan(waiting: Sequence[Ticket], running: Iterable[Ticket], max_rows: int, policy: Policy = Policy(),
         costs: CostModel | None = None) -> Plan:
    """Decide one iteration's admissions, refusals and drops. ``waiting`` is in arrival order;
    ``running`` are the requests in flight; ``costs`` predicts iterations (goodput, module docstring)."""
    out = Plan()
    rows: dict[str, int] = {}  # model -> image rows in flight (every image size of it together)
    load = _Load(costs if policy.goodput else None, max_rows)
    for t in running:
        if t.dead:
            out.drop_running.append(t.key)
        else:
            rows[t.model] = rows.get(t.model, 0) + t.rows
            load.add(t)
    alive = []
    for t in waiting:
        (out.drop_waiting if t.dead else alive).append(t.key if t.dead else t)
    alive.sort(key=lambda t: _order(t, policy, load.active))  # stable: arrival order breaks ties
    blocked: set[str] = set()
    for t in alive:
        if t.model in blocked:
            continue
        # the reserved rows are for latency-sensitive requests, unless nothing of the model runs (a
        # request larger than the rest would otherwise never start)
        limit = max_rows if policy.short(t) or not rows.get(t.model) else max_rows - policy.reserve_rows
        verdict = load.judge(t, policy.margin) if load.measures(t) else "admit"
        if verdict == "refuse":
            out.refuse.append((t.key, load.earliest_finish(t), load.backlog_s(t)))
            continue
        if verdict == "admit" and rows.get(t.model, 0) + t.rows <= limit:
            out.admit.append(t.key)
            rows[t.model] = rows.get(t.model, 0) + t.rows
            if load.measures(t):
                out.predicted[t.key] = load.finish_if_admitted(t)
            load.add(t)
            continue
        load.queue(t)  # it waits: the ones behind it wait for it too
        if policy.order == "fifo" or t.waited_s >= policy.starvation_s:
            blocked.add(t.model)  # it goes next: nobody overtakes it
    return out


def _order(t: Ticket, policy: Policy, goodput: bool) -> tuple:
    starved = t.waited_s >= policy.starvation_s
    if policy.order == "fifo":
        return (0,)
    if not goodput:
        return (not starved, not policy.short(t))
    return (not starved, not policy.short(t), t.deadline_s is None,
            t.deadline_s if t.deadline_s is not None else 0.0)


class _Load:
    """What is in flight, in the cost model's terms, per engine batch (a model at one image size):
    network rows (those of requests with a deadline apart: bulk rows yield to them), the requests
    with deadlines that an admission must not make late, and the work waiting ahead."""

    def __init__(self, costs: CostModel | None, max_rows: int):
        self.costs, self.max_rows = costs, max_rows
        self.all: dict[str, int] = {}  # batch -> network rows of every request
        self.urgent: dict[str, int] = {}  # batch -> network rows of requests with a deadline
        self.deadlines: list[Ticket] = []
        self.longest: dict[str, int] = {}  # batch -> most evaluations left of a request in flight
        self.ahead: dict[str, float] = {}  # batch -> network-row evaluations of the requests waiting ahead

    @property
    def active(self) -> bool:
        return self.costs is not None

    def measures(self, t: Ticket) -> bool:
        return self.costs is not None and self.costs.known(t.cost_key)

    def add(self, t: Ticket) -> None:
        k = t.cost_key
        self.all[k] = self.all.get(k, 0) + t.network
        if t.deadline_s is not None:
            self.urgent[k] = self.urgent.get(k, 0) + t.network
            self.deadlines.append(t)
        self.longest[k] = max(self.longest.get(k, 0), t.left)

    def queue(self, t: Ticket) -> None:
        self.ahead[t.cost_key] = self.ahead.get(t.cost_key, 0.0) + t.left * t.network

    def _rows(self, t: Ticket) -> dict[str, int]:
        """Network rows per batch that the iterations t joins would step for t's sake: with a
        deadline, the deadline rows (bulk rows yield); without one, every row."""
        return dict(self.urgent if t.deadline_s is not None else self.all)

    def finish_if_admitted(self, t: Ticket) -> float:
        rows = self._rows(t)
        rows[t.cost_key] = rows.get(t.cost_key, 0) + t.network
        return t.left * self.costs.iteration_s(rows)

    def _drain_s(self, t: Ticket) -> float:
        """Seconds until the rows in flight of t's batch are done."""
        return self.longest.get(t.cost_key, 0) * self.costs.iteration_s(self._rows(t))

    def _knee_blocks(self, t: Ticket) -> bool:
        in_batch = self._rows(t).get(t.cost_key, 0)
        return bool(in_batch) and in_batch + t.network > self.costs.knee(t.cost_key, 2 * self.max_rows)

    def earliest_finish(self, t: Ticket) -> float:
        """The sooner of two predictions: joining now beside what runs (when nothing waits ahead of it
        and the knee lets it), or once the batch's rows in flight have drained, after the work waiting
        ahead of it (done at the batch's best measured rate, batched together), and never sooner than
        its own evaluations one after another. Optimistic: from the fastest iterations ever measured
        (what a refusal rests on: a slow spell must not refuse what the machine can do)."""
        costs, rows = self.costs, self._rows(t)
        drain = self.longest.get(t.cost_key, 0) * costs.iteration_s(rows, fastest=True)
        now = dict(rows)
        now[t.cost_key] = now.get(t.cost_key, 0) + t.network
        rows[t.cost_key] = t.network
        alone = t.left * costs.iteration_s(rows, fastest=True)
        ahead = self.ahead.get(t.cost_key, 0.0)
        later = drain + max(alone, (ahead + t.left * t.network) / costs.best_rate(t.cost_key))
        if ahead or self._knee_blocks(t):
            return later
        return min(t.left * costs.iteration_s(now, fastest=True), later)

    def backlog_s(self, t: Ticket) -> float:
        """Seconds until what runs and waits ahead of t in its batch is done (a retry's delay)."""
        return self._drain_s(t) + self.ahead.get(t.cost_key, 0.0) / self.costs.best_rate(t.cost_key)

    def judge(self, t: Ticket, margin: float) -> str:
        """"admit", "wait" or "refuse" (module docstring)."""
        rows = self._rows(t)
        before = self.costs.iteration_s(rows)
        knee_blocks = self._knee_blocks(t)
        rows[t.cost_key] = rows.get(t.cost_key, 0) + t.network
        after = self.costs.iteration_s(rows)
        if t.deadline_s is not None:
            if self.earliest_finish(t) * margin > t.deadline_s:
                return "refuse"
            # with nothing of its batch running, judged as the refusal was (optimistically): a request
            # that is not refused then starts, and its iterations correct the estimates
            idle = not self._rows(t).get(t.cost_key) and not self.ahead.get(t.cost_key)
            if not idle and t.left * after * margin > t.deadline_s:
                return "wait"
        for j in self.deadlines:
            still_on_time = j.left * before * margin <= j.deadline_s
            if still_on_time and j.left * after * margin > j.deadline_s:
                return "wait"
        return "wait" if knee_blocks else "admit"
