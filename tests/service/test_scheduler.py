"""The scheduler's decisions, as a pure function (no model, no thread, no clock)."""

import pytest

from service.engine.scheduler import Policy, Ticket, plan

FIFO = Policy(order="fifo")


def test_admits_in_order_up_to_the_row_cap():
    waiting = [Ticket(1, "m", 3), Ticket(2, "m", 3), Ticket(3, "m", 1)]
    p = plan(waiting, [Ticket(9, "m", 2)], max_rows=9, policy=FIFO)
    assert p.admit == [1, 2, 3] and not p.drop_waiting and not p.drop_running
    p = plan(waiting, [Ticket(9, "m", 4)], max_rows=8, policy=FIFO)
    # 4 + 3 fits, 4 + 3 + 3 does not: the third one waits behind the second (no overtaking).
    assert p.admit == [1]


def test_fifo_a_large_request_is_not_starved_by_small_ones_behind_it():
    p = plan([Ticket(1, "m", 6), Ticket(2, "m", 1)], [Ticket(9, "m", 4)], max_rows=8, policy=FIFO)
    assert p.admit == []


def test_models_are_independent():
    p = plan([Ticket(1, "a", 8), Ticket(2, "b", 2)], [Ticket(9, "a", 1)], max_rows=8)
    assert p.admit == [2]


def test_dead_requests_are_dropped_and_free_their_rows():
    waiting = [Ticket(1, "m", 2, cancelled=True), Ticket(2, "m", 4), Ticket(3, "m", 1, expired=True)]
    running = [Ticket(7, "m", 4, cancelled=True), Ticket(8, "m", 4)]
    p = plan(waiting, running, max_rows=8)
    assert p.drop_waiting == [1, 3] and p.drop_running == [7] and p.admit == [2]


def test_short_first_short_requests_overtake_bulk_ones_in_arrival_order():
    waiting = [Ticket(1, "m", 2, work=50), Ticket(2, "m", 1, work=10), Ticket(3, "m", 2, work=100),
               Ticket(4, "m", 1, work=19)]
    assert plan(waiting, [], max_rows=8).admit == [2, 4, 1, 3]
    assert plan(waiting, [], max_rows=3).admit == [2, 4]  # then 1 does not fit, and 3 cannot pass it
    # a bulk request that does not fit does not hold back a smaller bulk one behind it
    assert plan([Ticket(1, "m", 6, work=50), Ticket(2, "m", 1, work=50)], [Ticket(9, "m", 4)], 8).admit == [2]


def test_reserved_rows_are_for_short_requests_only():
    policy = Policy(reserve_rows=2)
    running = [Ticket(9, "m", 5, work=50)]
    assert plan([Ticket(1, "m", 1, work=50)], running, 8, policy).admit == [1]  # 6 <= 8 - 2
    assert plan([Ticket(1, "m", 2, work=50)], running, 8, policy).admit == []  # 7 > 6
    assert plan([Ticket(1, "m", 3, work=20)], running, 8, policy).admit == [1]  # short: all 8 rows


def test_a_starved_request_goes_first_and_nobody_overtakes_it():
    policy = Policy(starvation_s=10)
    waiting = [Ticket(1, "m", 1, work=10), Ticket(2, "m", 6, work=100, waited_s=11), Ticket(3, "m", 1, work=10)]
    assert plan(waiting, [Ticket(9, "m", 4)], 8, policy).admit == []  # 2 is first and does not fit yet
    assert plan(waiting, [], 8, policy).admit == [2, 1, 3]


def test_bad_policy_is_refused():
    with pytest.raises(ValueError):
        Policy(order="random")


# --- goodput: admission by predicted finish (a cost model with fake, known costs; no clock) ---------

from service.engine.costs import CostModel, bucket  # noqa: E402


def linear_costs(fixed=0.1, per_row=0.1, model="m", knee_gain=1.0) -> CostModel:
    """An iteration costs fixed + per_row·(network rows), measured at every power of two up to 256
    (``knee_gain`` 1: no knee, unless more rows make images/s fall)."""
    costs = CostModel(knee_gain=knee_gain)
    for n in (1, 2, 4, 8, 16, 32, 64, 128, 256):
        costs.observe(model, n, fixed + per_row * n)
    return costs


def test_the_cost_model_interpolates_and_extrapolates():
    costs = linear_costs(0.1, 0.1)
    assert costs.cost("m", 0) == 0 and costs.cost("x", 5) == 0  # nothing, or nothing known
    assert abs(costs.cost("m", 8) - 0.9) < 1e-9 and abs(costs.cost("m", 12) - 1.3) < 1e-9  # exact / linear between
    assert abs(costs.cost("m", 512) - 2 * 25.7) < 1e-9  # beyond: proportional to rows
    assert bucket(5) == 4 and bucket(6) == 8 and bucket(0) == 1
    costs.observe("m", 8, 1.9)  # a slower measurement moves the estimate by the smoothing weight
    assert abs(costs.cost("m", 8) - (0.7 * 0.9 + 0.3 * 1.9)) < 1e-9
    assert abs(costs.iteration_s({"m": 8, "x": 3}) - costs.cost("m", 8)) < 1e-9


def test_the_knee_is_where_doubling_stops_paying():
    # fixed 1 s, 0.1 s per row: images/s n/(1 + 0.1 n): 8.65 at 64 rows, and the best (256) is 9.62 < 1.15 x 8.65
    assert linear_costs(1.0, 0.1, knee_gain=1.15).knee("m", 512) == 64
    clean, noisy = linear_costs(0.01, 0.01, knee_gain=1.05), linear_costs(0.01, 0.01, knee_gain=1.05)
    noisy.estimates["m"][4] *= 3  # one slow measurement does not cap the batch below what pays
    assert noisy.knee("m", 512) == clean.knee("m", 512) == 32
    assert linear_costs(0.0, 0.1, knee_gain=1.15).knee("m", 512) == 1  # proportional (a CPU): one row is as good
    assert linear_costs(10.0, 0.001, knee_gain=1.15).knee("m", 256) == 256  # fixed cost dominates (a GPU)
    assert linear_costs(0.0, 0.1).knee("m", 512) == 512  # gain 1: only a fall in images/s would cap
    assert CostModel().knee("m", 64) == 64  # unmeasured: no cap


def T(key, rows=1, work=10, deadline=None, waited=0.0, remaining=None, model="m", net=None, **kw):
    return Ticket(key, model, rows, work=work, waited_s=waited, deadline_s=deadline, remaining=remaining,
                  net_rows=net, **kw)


GOODPUT = Policy(short_work=0, margin=1.0)  # one latency class: only deadlines order


def test_earliest_deadline_first_and_bulk_last():
    costs = linear_costs(0.0, 0.01)
    waiting = [T(1, deadline=50), T(2), T(3, deadline=10), T(4, deadline=30)]
    assert plan(waiting, [], 64, GOODPUT, costs).admit == [3, 4, 1, 2]
    # without a cost model the old order stands (arrival)
    assert plan(waiting, [], 64, GOODPUT).admit == [1, 2, 3, 4]


def test_an_infeasible_request_is_refused_at_once_with_a_retry_delay():
    costs = linear_costs(0.0, 0.1)  # 0.1 s per network row and iteration
    running = [T(9, rows=4, remaining=20, deadline=100)]  # 4 rows: 0.4 s per iteration, 8 s to go
    p = plan([T(1, rows=1, work=50, deadline=10)], running, 64, GOODPUT, costs)  # 50 x 0.5 s = 25 s > 10 s
    assert p.admit == [] and [k for k, _, _ in p.refuse] == [1]
    _, predicted, retry = p.refuse[0]
    # the sooner of: beside the running rows, 50 x 0.5 = 25 s; after them (20 x 0.4 = 8 s), 8 + 50 x 0.1 = 13 s
    assert abs(predicted - 13.0) < 1e-6 and abs(retry - 8.0) < 1e-6  # the backlog: 20 iterations of 0.4 s
    # alone it could make it: 50 x 0.1 = 5 s
    assert plan([T(1, rows=1, work=50, deadline=10)], [], 64, GOODPUT, costs).admit == [1]


def test_no_admission_pushes_a_running_request_past_its_deadline():
    costs = linear_costs(0.0, 0.1)
    running = [T(9, rows=2, remaining=40, deadline=10)]  # 40 x 0.2 s = 8 s of 10: on time
    # adding 1 row: 40 x 0.3 = 12 s > 10 s, so the newcomer (feasible itself: 5 x 0.3 = 1.5 s) waits
    p = plan([T(1, rows=1, work=5, deadline=100)], running, 64, GOODPUT, costs)
    assert p.admit == [] and p.refuse == []
    # a running request already late does not block others
    late = [T(9, rows=2, remaining=40, deadline=5)]
    assert plan([T(1, rows=1, work=5, deadline=100)], late, 64, GOODPUT, costs).admit == [1]
    # bulk work (no deadline) may not push it either, and is never refused
    p = plan([T(1, rows=1, work=5)], running, 64, GOODPUT, costs)
    assert p.admit == [] and p.refuse == []


def test_bulk_rows_yield_to_deadline_work():
    costs = linear_costs(0.0, 0.1)
    bulk = [T(8, rows=8, remaining=100)]  # 8 bulk rows in flight
    # a deadline request is judged as if they were not there (the engine steps them within the knee)
    p = plan([T(1, rows=1, work=10, deadline=2)], bulk, 64, GOODPUT, costs)  # 10 x 0.1 = 1 s <= 2 s
    assert p.admit == [1] and abs(p.predicted[1] - 1.0) < 1e-9


def test_the_starvation_bound_holds_under_goodput():
    costs = linear_costs(0.0, 0.01)
    policy = Policy(short_work=0, margin=1.0, starvation_s=10)
    waiting = [T(1, deadline=5), T(2, rows=6, deadline=500, waited=11), T(3, deadline=1)]
    assert plan(waiting, [T(9, rows=4, remaining=5)], 8, policy, costs).admit == []  # 2 first; it does not fit
    assert plan(waiting, [], 8, policy, costs).admit == [2, 3, 1]


def test_the_knee_caps_the_batch():
    costs = linear_costs(1.0, 0.1, knee_gain=1.15)  # knee at 64 network rows
    running = [T(9, rows=56, remaining=5, deadline=1000)]
    p = plan([T(1, rows=4, deadline=1000), T(2, rows=6, deadline=1000)], running, 64, GOODPUT, costs)
    assert p.admit == [1]  # 56 + 4 = 60 rows; 6 more would pass the knee
    assert plan([T(1, rows=40, deadline=1000)], [], 64, GOODPUT, costs).admit == [1]  # alone, whatever its size


def test_work_waiting_ahead_counts_so_a_burst_is_refused_early():
    """Eight identical requests that each fit alone: the ones that the work ahead of them (done at
    the best measured rate) would push past the deadline are refused now, not when they run out."""
    costs = linear_costs(0.0, 0.1, knee_gain=1.05)  # proportional: knee 1, one request at a time
    burst = [T(k, rows=1, work=10, deadline=3.5) for k in range(8)]  # each 10 x 0.1 = 1 s alone
    p = plan(burst, [], 64, GOODPUT, costs)
    assert p.admit == [0] and [k for k, _, _ in p.refuse] == [3, 4, 5, 6, 7]  # 1, 2 wait: done by 2 s and 3 s
    retries = [r for _, _, r in p.refuse]
    assert retries == sorted(retries) and retries[0] > 1.0  # later in line, later retry


def test_a_feasible_request_on_an_idle_engine_is_admitted_or_refused_never_left_waiting():
    costs = linear_costs(0.0, 0.1)
    near = plan([T(1, rows=1, work=10, deadline=1.05)], [], 64, Policy(short_work=0, margin=1.1), costs)
    assert near.admit == [] and [k for k, _, _ in near.refuse] == [1]  # 1 s x 1.1 > 1.05: refused at once
    assert plan([T(1, rows=1, work=10, deadline=1.2)], [], 64, Policy(short_work=0, margin=1.1), costs).admit == [1]


def test_another_image_size_is_predicted_from_the_native_one():
    costs = linear_costs(0.0, 0.1)
    costs.alias("m@96x64", "m", 1.5)  # half as many pixels again
    assert costs.known("m@96x64") and abs(costs.cost("m@96x64", 4) - costs.cost("m", 6)) < 1e-9
    costs.observe("m@96x64", 4, 9.0)  # once measured itself, its own numbers
    assert abs(costs.cost("m@96x64", 4) - 9.0) < 1e-9
    # the row cap is per model whatever the size; the costs are per batch
    p = plan([T(1, rows=6, model="m", batch="m@96x64", deadline=100, work=1)], [T(9, rows=4, deadline=100)], 8,
             GOODPUT, costs)
    assert p.admit == []


def test_a_bulk_request_as_large_as_the_batch_starts_when_nothing_else_runs():
    """Reserved rows wait for latency-sensitive requests only while something runs: an 8-image bulk
    request with max_rows 8 and 1 reserved row would otherwise never start."""
    policy = Policy(reserve_rows=1, order="fifo", goodput=False)
    assert plan([T(1, rows=8, work=50)], [], 8, policy).admit == [1]
    assert plan([T(1, rows=8, work=50)], [T(9, rows=1, work=50)], 8, policy).admit == []


def test_a_slow_spell_does_not_make_the_engine_refuse_what_the_machine_can_do():
    """Iterations measured 10x slower for a while (another process on the cores) raise the running
    estimates, not the fastest ones a refusal rests on: with nothing running, a request that the
    machine at its best can finish starts, and its own iterations bring the estimates back."""
    costs = linear_costs(0.0, 0.1)
    for _ in range(20):
        for n in (1, 2, 4, 8):
            costs.observe("m", n, 1.0 * n)  # 10x slower than before
    assert costs.cost("m", 1) > 0.9 and abs(costs.cost("m", 1, fastest=True) - 0.1) < 1e-9
    p = plan([T(1, rows=1, work=10, deadline=3.0)], [], 64, GOODPUT, costs)  # 1 s at its best, 10 s now
    assert p.admit == [1] and p.refuse == []
    # beside running work the running estimates still decide: it waits rather than slowing others
    p = plan([T(1, rows=1, work=10, deadline=3.0)], [T(9, rows=1, remaining=1, deadline=100)], 64, GOODPUT, costs)
    assert p.admit == [] and p.refuse == []
