"""The scheduler's decisions, as a pure function (no model, no thread, no clock)."""

from service.engine.scheduler import Ticket, plan


def test_admits_in_order_up_to_the_row_cap():
    waiting = [Ticket(1, "m", 3), Ticket(2, "m", 3), Ticket(3, "m", 1)]
    p = plan(waiting, [Ticket(9, "m", 2)], max_rows=9)
    assert p.admit == [1, 2, 3] and not p.drop_waiting and not p.drop_running
    p = plan(waiting, [Ticket(9, "m", 4)], max_rows=8)
    # 4 + 3 fits, 4 + 3 + 3 does not: the third one waits behind the second (no overtaking).
    assert p.admit == [1]


def test_a_large_request_is_not_starved_by_small_ones_behind_it():
    p = plan([Ticket(1, "m", 6), Ticket(2, "m", 1)], [Ticket(9, "m", 4)], max_rows=8)
    assert p.admit == []


def test_models_are_independent():
    p = plan([Ticket(1, "a", 8), Ticket(2, "b", 2)], [Ticket(9, "a", 1)], max_rows=8)
    assert p.admit == [2]


def test_dead_requests_are_dropped_and_free_their_rows():
    waiting = [Ticket(1, "m", 2, cancelled=True), Ticket(2, "m", 4), Ticket(3, "m", 1, expired=True)]
    running = [Ticket(7, "m", 4, cancelled=True), Ticket(8, "m", 4)]
    p = plan(waiting, running, max_rows=8)
    assert p.drop_waiting == [1, 3] and p.drop_running == [7] and p.admit == [2]
