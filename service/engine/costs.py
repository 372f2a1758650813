"""The cost model: seconds of one engine iteration of a model as a function of its network rows,
measured online. Pure data and arithmetic (no clock, no tensors, no threads): the engine feeds it
measurements and the scheduler (:mod:`service.engine.scheduler`) reads predictions from it.

A *network row* is one row of the forward pass: an image row, twice when it is guided (its
conditional and unconditional halves). Per model (engine batch) the model keeps a running estimate
(an exponential moving average) of the iteration's seconds at each power-of-two bucket of network
rows, a measurement going to the nearest bucket, scaled to it as if the cost were proportional to
rows within that factor of √2. Between measured buckets the cost is interpolated linearly in rows;
below the smallest it is the smallest's (a near-empty iteration's fixed costs dominate); above the
largest it grows in proportion to rows (the conservative guess: batching gains nothing more).

From it come:

- :meth:`CostModel.iteration_s`: the predicted seconds of one engine iteration with given network
  rows per model (models are stepped one after another, so their costs add);
- :meth:`CostModel.knee`: the network rows past which more rows stop raising images per second on
  this device (no larger batch makes ``knee_gain`` more images/s), as far as sizes have been
  measured (beyond, the batch may grow, and its iterations are measured): a small batch on a CPU,
  a large one on a GPU;
- :func:`finish_s`: a request's predicted seconds to finish, given the iteration's cost and its
  remaining evaluations.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field


def bucket(rows: int) -> int:
    """The power of two nearest ``rows`` (in log scale), at least 1."""
    return 1 << max(0, round(math.log2(max(1, rows))))


@dataclass
class CostModel:
    smoothing: float = 0.3  # weight of a new measurement in a bucket's running estimate
    knee_gain: float = 1.05  # doubling rows must raise images/s at least this much (5 %) to be worth it
    estimates: dict[str, dict[int, float]] = field(default_factory=dict)  # model -> bucket -> seconds
    counts: dict[str, dict[int, int]] = field(default_factory=dict)
    aliases: dict[str, tuple[str, float]] = field(default_factory=dict)  # model -> (base model, row factor)
    fastest: dict[str, dict[int, float]] = field(default_factory=dict)  # model -> bucket -> least seconds seen

    def observe(self, model: str, rows: int, seconds: float) -> None:
        """One measured iteration of ``model`` with ``rows`` network rows."""
        if rows < 1 or not seconds > 0 or not math.isfinite(seconds):
            return
        b = bucket(rows)
        scaled = seconds * b / rows
        table, counts = self.estimates.setdefault(model, {}), self.counts.setdefault(model, {})
        old = table.get(b)
        table[b] = scaled if old is None else (1 - self.smoothing) * old + self.smoothing * scaled
        counts[b] = counts.get(b, 0) + 1
        least = self.fastest.setdefault(model, {})
        least[b] = min(least.get(b, math.inf), scaled)

    def known(self, model: str) -> bool:
        if self.estimates.get(model):
            return True
        base = self.aliases.get(model)
        return base is not None and bool(self.estimates.get(base[0]))

    def cost(self, model: str, rows: int, fastest: bool = False) -> float:
        """Predicted seconds of one iteration of ``model`` over ``rows`` network rows (0 for none;
        0 for a model never measured: nothing is known, nothing is refused). ``fastest``: from the
        least seconds ever measured instead of the running estimates (the machine at its best: what
        a refusal rests on, so that a slow spell (another process on the cores) cannot make the
        service refuse everything, and never run again to learn better)."""
        table = (self.fastest if fastest else self.estimates).get(model)
        if not table and model in self.aliases:
            base, factor = self.aliases[model]
            return self.cost(base, max(1, math.ceil(rows * factor)), fastest) if rows > 0 else 0.0
        if rows <= 0 or not table:
            return 0.0
        sizes = sorted(table)
        if rows <= sizes[0]:
            return table[sizes[0]]
        if rows >= sizes[-1]:
            return table[sizes[-1]] * rows / sizes[-1]
        hi = next(s for s in sizes if s >= rows)
        lo = max(s for s in sizes if s <= rows)
        if hi == lo:
            return table[hi]
        return table[lo] + (table[hi] - table[lo]) * (rows - lo) / (hi - lo)

    def best_rate(self, model: str) -> float:
        """The most network-row evaluations per second any measured batch size reached, ever (inf when
        nothing is measured)."""
        table = self.fastest.get(model)
        if not table and model in self.aliases:
            base, factor = self.aliases[model]
            return self.best_rate(base) / factor
        return max((n / s for n, s in table.items()), default=math.inf) if table else math.inf

    def alias(self, model: str, base: str, factor: float) -> None:
        """Until ``model`` is measured itself, predict it as ``base`` with ``factor`` times the rows
        (another image size of a model: a row of it costs about its pixels' share)."""
        self.aliases[model] = (base, float(factor))

    def forget(self, model: str) -> None:
        """Drop what is known of ``model`` and of every batch predicted from it (its weights changed
        shape: another architecture was loaded under its name)."""
        for key in [k for k, (base, _) in self.aliases.items() if base == model] + [model]:
            for table in (self.estimates, self.counts, self.fastest, self.aliases):
                table.pop(key, None)

    def copy(self, source: str, target: str) -> None:
        """Predict ``target`` from ``source``'s measurements (the same architecture under another
        name: a retrained checkpoint costs what the one before it did)."""
        for table in (self.estimates, self.counts, self.fastest):
            if source in table:
                table[target] = dict(table[source])

    def iteration_s(self, rows: Mapping[str, int], fastest: bool = False) -> float:
        """Predicted seconds of one engine iteration with these network rows per model."""
        return sum(self.cost(m, n, fastest) for m, n in rows.items())

    def knee(self, model: str, largest: int) -> int:
        """The fewest network rows (a power of two) that no larger measured batch beats by
        ``knee_gain`` in images/s (every larger size is compared, so one noisy measurement does not
        move it); ``largest`` where the largest measured size still pays (or nothing is measured),
        so that the batch may grow and be measured there."""
        if not self.estimates.get(model) and model in self.aliases:
            base, factor = self.aliases[model]
            return max(1, int(self.knee(base, largest) / factor))
        measured = sorted(self.estimates.get(model, {}))
        if not measured:
            return largest
        sizes = [1 << k for k in range(max(1, min(largest, measured[-1])).bit_length())]
        speed = [n / self.cost(model, n) for n in sizes]
        for k, n in enumerate(sizes):
            if n == sizes[-1]:
                break  # nothing measured beyond: it may still pay
            if max(speed[k:]) < self.knee_gain * speed[k]:
                return n
        return largest


def finish_s(remaining: int, iteration_s: float) -> float:
    """Seconds until a request with ``remaining`` evaluations per image is done, each iteration
    taking ``iteration_s`` (every row advances one evaluation per iteration)."""
    return remaining * iteration_s
