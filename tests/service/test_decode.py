"""The decode queue on its own (a decoder that records its calls): chunks of at most chunk_rows,
finished rows before previews, one waiting preview per request, rows of ended requests skipped."""

from __future__ import annotations

import torch

from diffusion import Condition
from service.engine.decode import DecodeQueue, DecodeWork
from service.engine.job import GenerationSpec, Job


def job(n=1) -> Job:
    return Job(GenerationSpec("m", Condition(None, None), "ddim", 2, 0.0, tuple(range(n))), deadline=1e9)


def queue(chunk):
    calls = []

    def decode(owners, samples):
        calls.append([(o[0].id, o[1]) for o in owners])
        return samples * 2
    return DecodeQueue(decode, chunk), calls


def rows(j, k, value=1.0):
    return DecodeWork([(j, i) for i in range(k)], torch.full((k, 1, 2, 2), value))


def test_chunks_are_bounded_and_finished_rows_go_first():
    q, calls = queue(chunk=3)
    a, b, p = job(4), job(2), job(2)
    q.put(DecodeWork([(p, 0), (p, 1)], torch.ones(2, 1, 2, 2), preview=(1, 4)))
    q.put(rows(a, 4))
    q.put(rows(b, 2))
    out = q.step()
    assert [len(c) for c in calls] == [3] and all(owner in (a.id,) for owner, _ in calls[0])  # a's rows, no preview
    assert len(out) == 1 and out[0][2] is None and out[0][1].shape[0] == 3 and float(out[0][1][0, 0, 0, 0]) == 2.0
    q.step()
    assert [o for o, _ in calls[1]] == [a.id, b.id, b.id]  # the rest of a, then b: still finals first
    out = q.step()
    assert out[0][2] == (1, 4) and out[0][1].shape[0] == 2 and not q  # the preview last, whole


def test_one_preview_per_request_waits_and_ended_requests_are_skipped():
    q, calls = queue(chunk=8)
    j = job(2)
    for done in (1, 2, 3):
        q.put(DecodeWork([(j, 0), (j, 1)], torch.full((2, 1, 2, 2), float(done)), preview=(done, 9)))
    assert q.rows == 2  # the newer previews replaced the older ones
    gone = job(3)
    q.put(rows(gone, 3))
    gone.cancel()
    out = q.step()
    assert [r[2] for r in out] == [(3, 9)] and calls == [[(j.id, 0), (j.id, 1)]]  # the cancelled rows never decoded
    assert not q
