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
