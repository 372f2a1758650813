"""The engine's scheduling, driven iteration by iteration with :meth:`Engine.iterate` (no thread,
no GPU): admission, retirement, cancellation, deadlines, mixed schedulers and step counts, no
head-of-line blocking, overload, failures, shutdown; and batch invariance on a real tiny model."""

from __future__ import annotations

import threading

import pytest
import torch

from diffusion import Condition
from service.engine import DeadlineExceeded, Engine, EngineClosed, GenerationFailed, GenerationSpec, QueueFull
from service.engine.scheduler import Policy
from tests.service.fakes import FakeModel


def spec(model="fake", scheduler="ddim", steps=5, n=1, seed=0, guidance=0.0, label=1, **kw):
    return GenerationSpec(model=model, condition=Condition(label, None), scheduler=scheduler, steps=steps,
                          guidance=guidance, seeds=tuple(seed + k for k in range(n)), **kw)


def run_until(engine, pred, limit=10_000):
    for _ in range(limit):
        if pred():
            return
        engine.iterate()
    raise AssertionError("condition never met")


def test_all_rows_share_one_forward_pass_whatever_their_scheduler_and_steps():
    fake = FakeModel()
    eng = Engine({"fake": fake}, max_rows=64)
    jobs = [eng.submit(spec(scheduler=s, steps=st, n=n), 60) for s, st, n in
            [("ddim", 3, 2), ("heun", 4, 1), ("pndm", 5, 3), ("ddpm", 2, 1), ("dpmpp_2m", 6, 1)]]
    eng.iterate()
    assert fake.batches == [8]  # guidance 0: each row evaluated once, all in one pass
    run_until(eng, lambda: all(j.future.done() for j in jobs))
    for j in jobs:
        r = j.future.result()
        assert r.images.shape == (j.rows, 1, 4, 4) and torch.isfinite(r.images).all()
    assert eng.rows_in_flight == 0
    # finished rows left at once: the batch shrank as requests finished
    assert fake.batches == sorted(fake.batches, reverse=True) and fake.batches[-1] < 8


def test_new_requests_join_at_the_next_iteration_and_finished_ones_leave_at_once():
    fake = FakeModel()
    eng = Engine({"fake": fake})
    long = eng.submit(spec(steps=50), 60)
    eng.iterate()
    short = eng.submit(spec(steps=3, n=2), 60)
    eng.iterate()
    assert fake.batches == [1, 3]
    eng.iterate(), eng.iterate()
    assert short.future.done() and not long.future.done()
    assert eng.rows_in_flight == 1
    eng.iterate()
    assert fake.batches[-1] == 1


def test_no_head_of_line_blocking():
    eng = Engine({"fake": FakeModel()})
    long = eng.submit(spec(steps=1000, scheduler="ddpm"), 600)
    for _ in range(3):
        eng.iterate()
    short = eng.submit(spec(steps=10, scheduler="dpmpp_2m"), 600)
    n = 0
    while not short.future.done():
        eng.iterate()
        n += 1
    assert n == 10 and not long.future.done()
    assert long.future.result  # still running; it finishes later
    run_until(eng, long.future.done)
    assert eng.iterations == 1000


def test_the_row_cap_holds_and_waiting_requests_start_when_rows_free():
    fake = FakeModel()
    eng = Engine({"fake": fake}, max_rows=4)
    a = eng.submit(spec(steps=3, n=3), 60)
    b = eng.submit(spec(steps=3, n=2), 60)
    eng.iterate()
    assert eng.queue_depth == 1 and eng.rows_in_flight == 3
    run_until(eng, lambda: b.future.done())
    assert a.future.done() and max(fake.batches) <= 4


def test_a_cancelled_request_leaves_at_the_next_iteration():
    fake = FakeModel()
    eng = Engine({"fake": fake})
    keep = eng.submit(spec(steps=20), 60)
    gone = eng.submit(spec(steps=20, n=3), 60)
    eng.iterate()
    assert eng.rows_in_flight == 4
    eng.cancel(gone)
    eng.iterate()
    assert fake.batches[-1] == 1 and eng.rows_in_flight == 1 and gone.future.cancelled()
    waiting = eng.submit(spec(steps=5), 60)
    eng.cancel(waiting)
    eng.iterate()
    assert eng.queue_depth == 0 and fake.batches[-1] == 1
    run_until(eng, keep.future.done)


def test_a_request_past_its_deadline_fails_and_its_rows_leave():
    now = [0.0]
    eng = Engine({"fake": FakeModel()}, clock=lambda: now[0])
    job = eng.submit(spec(steps=100), timeout_s=5)
    other = eng.submit(spec(steps=100), timeout_s=500)
    eng.iterate()
    now[0] = 10.0
    eng.iterate()
    with pytest.raises(DeadlineExceeded):
        job.future.result(0)
    assert eng.rows_in_flight == 1 and not other.future.done()


def test_a_full_queue_refuses_at_once_and_stays_bounded():
    eng = Engine({"fake": FakeModel()}, max_rows=1, max_queue=3)
    for _ in range(3):
        eng.submit(spec(), 60)
    with pytest.raises(QueueFull) as e:
        eng.submit(spec(), 60)
    assert e.value.retry_after_s >= 1 and eng.queue_depth == 3
    with pytest.raises(KeyError):
        eng.submit(spec(model="other"), 60)


def test_a_failing_model_fails_its_requests_and_the_engine_goes_on():
    bad, good = FakeModel("bad", fail=True), FakeModel("good")
    eng = Engine({"bad": bad, "good": good})
    b = eng.submit(spec(model="bad"), 60)
    g = eng.submit(spec(model="good", steps=2), 60)
    eng.iterate()
    with pytest.raises(GenerationFailed):
        b.future.result(0)
    run_until(eng, g.future.done)
    assert g.future.result().images.shape[0] == 1
    bad.fail = False
    again = eng.submit(spec(model="bad", steps=2), 60)
    run_until(eng, again.future.done)
    assert again.future.exception() is None


def test_shutdown_finishes_work_in_flight_then_refuses():
    fake = FakeModel()
    eng = Engine({"fake": fake})
    eng.start()
    jobs = [eng.submit(spec(steps=30, seed=k), 60) for k in range(3)]
    eng.shutdown(grace_s=60)
    assert all(j.future.result(0).images.shape[0] == 1 for j in jobs)
    with pytest.raises(EngineClosed):
        eng.submit(spec(), 60)


def test_shutdown_past_its_grace_fails_what_is_left():
    fake = FakeModel()
    fake.gate = threading.Semaphore(0)  # the worker blocks inside its first forward pass
    eng = Engine({"fake": fake})
    eng.start()
    job = eng.submit(spec(steps=50), 60)
    stopper = threading.Thread(target=eng.shutdown, kwargs={"grace_s": 0})
    stopper.start()
    fake.gate.release(10_000)
    stopper.join(30)
    assert not stopper.is_alive()
    with pytest.raises(EngineClosed):
        job.future.result(0)


@pytest.mark.parametrize("model", ["tiny-digits", "tiny-text"])
def test_same_seed_same_image_alone_or_co_batched(pipelines, model):
    pipe = pipelines[model]
    cond = pipe.resolve(prompt="seven")
    target = GenerationSpec(model, cond, "dpmpp_2m", 6, 2.0, (123,), clip="dynamic")

    def generate(specs):
        eng = Engine({model: pipe})
        jobs = [eng.submit(s, 60) for s in specs]
        run_until(eng, lambda: all(j.future.done() for j in jobs))
        return next(j for j in jobs if j.spec is target).future.result().images

    alone = generate([target])
    others = [GenerationSpec(model, pipe.resolve(class_label=3), "heun", 4, 0.0, (5, 6)),
              GenerationSpec(model, pipe.resolve(prompt="one"), "ddim", 9, 3.5, (7,), eta=1.0),
              GenerationSpec(model, cond, "ddpm", 3, 1.0, (8,)),
              GenerationSpec(model, cond, "dpmpp_2m", 10, 0.5, (9, 10, 11))]
    crowded = generate([others[0], others[1], target, others[2], others[3]])
    assert (alone - crowded).abs().max() <= 2 / 255  # model space spans 2: 1/255 of a pixel value
    direct = pipe.generate_tensor(prompt="seven", scheduler="dpmpp_2m", steps=6, guidance=2.0, seed=123,
                                  clip="dynamic")
    assert (alone - direct).abs().max() <= 2 / 255


def test_a_short_request_overtakes_queued_bulk_work_and_uses_the_reserved_rows():
    from service.engine.scheduler import Policy
    fake = FakeModel()
    eng = Engine({"fake": fake}, max_rows=4, policy=Policy(reserve_rows=1))
    bulk = [eng.submit(spec(steps=50, n=3, seed=10 * k), 600) for k in range(3)]
    eng.iterate()
    assert eng.rows_in_flight == 3  # the fourth row is reserved: the next bulk request waits
    short = eng.submit(spec(steps=10, scheduler="dpmpp_2m", seed=99), 600)
    n = 0
    while not short.future.done():
        eng.iterate()
        n += 1
    assert n == 10 and not any(b.future.done() for b in bulk)  # no wait for a full batch to drain
    run_until(eng, lambda: all(b.future.done() for b in bulk))


def test_latency_rows_cap_an_iteration_while_short_rows_are_in_flight():
    """Admission by rows alone (no goodput): short rows are the latency-sensitive ones."""
    fake = FakeModel()
    eng = Engine({"fake": fake}, max_rows=8, latency_rows=3, policy=Policy(goodput=False))
    long = eng.submit(spec(steps=40, n=6), 600)
    eng.iterate()
    assert fake.batches[-1] == 6  # no short rows: every row steps
    short = eng.submit(spec(steps=5, n=2, seed=50), 600)
    eng.iterate()
    assert fake.batches[-1] == 3  # the 2 short rows and 1 bulk row; 5 bulk rows wait
    run_until(eng, short.future.done)
    eng.iterate()
    assert fake.batches[-1] == 6
    run_until(eng, long.future.done)
    # the paused rows just waited: the images equal an uncapped run's
    ref = Engine({"fake": FakeModel()}, max_rows=8)
    again = ref.submit(spec(steps=40, n=6), 600)
    run_until(ref, again.future.done)
    torch.testing.assert_close(long.future.result().images, again.future.result().images, rtol=0, atol=0)


def test_bulk_rows_yield_to_rows_with_a_deadline():
    """Goodput: with rows that have a deadline in flight, an iteration steps bulk rows (no deadline)
    only within the cost model's knee; a long (50-step) deadline request steps every iteration."""
    fake = FakeModel()
    eng = Engine({"fake": fake}, max_rows=16)
    for n in (1, 2, 4, 8, 16, 32):  # measured: images/s stops rising past 4 network rows
        eng.costs.observe("fake", n, 0.01 * max(n, 4))
    eng.costs.observe = lambda *a: None  # (the fake network's real timings would move it)
    assert eng.costs.knee("fake", 32) == 4
    bulk = eng.submit(spec(steps=40, n=8), None)  # guidance 0: one network row per image
    eng.iterate()
    assert fake.batches[-1] == 8  # alone: every bulk row steps
    urgent = eng.submit(spec(steps=50, n=2, seed=70), 600)
    for _ in range(3):
        eng.iterate()
        assert fake.batches[-1] == 4  # the 2 deadline rows and 2 bulk rows: the knee's 4
    run_until(eng, urgent.future.done)
    assert not bulk.future.done()
    run_until(eng, bulk.future.done)


def test_an_engine_iteration_makes_at_most_one_host_sync_per_evaluation(pipelines):
    """Admission included; the steady state makes none (counted by torch.profiler)."""
    from tests.diffusion.test_step import syncs
    pipe = pipelines["tiny-digits"]
    eng = Engine({"tiny-digits": pipe}, max_rows=8)
    cond = pipe.resolve(class_label=2)
    pipe.cond_vector(cond)  # a known condition (cached, as after the first request for it)
    specs = [GenerationSpec("tiny-digits", cond, s, 8, w, (k, k + 1), clip=c)
             for k, (s, w, c) in enumerate([("ddim", 2.0, "static"), ("heun", 0.0, "dynamic"), ("pndm", 1.0, "none"),
                                             ("dpmpp_2m", 3.0, "none")])]
    jobs = []
    first = syncs(lambda: (jobs.extend(eng.submit(s, 60) for s in specs), eng.iterate()))
    steady = syncs(lambda: [eng.iterate() for _ in range(5)])
    assert steady == 0
    rest = syncs(lambda: run_until(eng, lambda: all(j.future.done() for j in jobs)))
    assert first + rest <= eng.iterations, (first, rest)


def test_listeners_get_progress_every_iteration_and_previews_when_due():
    from service.engine import Preview, Progress
    fake = FakeModel()
    eng = Engine({"fake": fake})
    events = []
    quiet = eng.submit(spec(steps=6, seed=1), 60)
    job = eng.submit(spec(scheduler="heun", steps=5, n=2, preview_every=3), 60, listener=events.append)
    assert eng.position(job) == 1 and eng.position(quiet) == 0
    eng.iterate()
    assert eng.position(job) is None
    assert isinstance(events[0], Progress) and (events[0].done, events[0].total) == (1, 8)  # heun 5 steps: 8 NFE
    run_until(eng, job.future.done)
    progress = [e for e in events if isinstance(e, Progress)]
    previews = [e for e in events if isinstance(e, Preview)]
    assert [p.done for p in progress] == list(range(1, 9))
    assert [p.done for p in previews] == [3, 6] and previews[0].images.shape == (2, 1, 4, 4)
    assert events.index(previews[0]) < events.index(progress[3])  # on the CPU a preview lands at once
    assert torch.isfinite(previews[-1].images).all()


def test_a_failing_listener_does_not_hurt_the_engine():
    eng = Engine({"fake": FakeModel()})

    def bad(event):
        raise RuntimeError("listener bug")
    job = eng.submit(spec(steps=3), 60, listener=bad)
    run_until(eng, job.future.done)
    assert job.future.result().images.shape == (1, 1, 4, 4)
