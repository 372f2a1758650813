"""Goodput under overload, over HTTP: a burst of requests with deadlines is answered as well as one at
a time would answer it, and what cannot make its deadline is refused early (503 with Retry-After),
never accepted and timed out. The network's cost is made deterministic: every forward pass sleeps
10 ms plus 10 ms per network row (the tiny model's own compute is small beside it), so an iteration
of one 8-image guided request (16 network rows) takes about 0.17 s, and batching pays little past
one request, as on a CPU. Nothing here asserts a duration: a 200 is an answer within its deadline,
and a 503 a refusal decided before it."""

from __future__ import annotations

import asyncio
import time

import pytest

from diffusion import Pipeline
from tests.service.asgi import serve

FIXED_S, PER_ROW_S = 0.010, 0.010
BURST = {"prompt": "seven", "num_images": 8, "steps": 4, "guidance": 2.0}


@pytest.fixture
def slow_net(monkeypatch):
    net = Pipeline.net

    def slow(self, x, t, cond):
        time.sleep(FIXED_S + PER_ROW_S * x.shape[0])
        return net(self, x, t, cond)
    monkeypatch.setattr(Pipeline, "net", slow)


def burst(make_settings, **settings):
    """Sixteen 8-image requests with a 3 s deadline at once, and one with 60 s beside them, after two
    warm-up requests (the first calibrates the cost model): the answers, and the metrics after."""
    async def body(app, client):
        for seed in (1, 2):
            assert (await client.post("/generate", json={**BURST, "seed": seed})).status_code == 200
        answers = await asyncio.gather(*[client.post("/generate", json={**BURST, "seed": 10 + k, "timeout_s": 3.0})
                                         for k in range(16)],
                                       client.post("/generate", json={**BURST, "seed": 99, "timeout_s": 60.0}))
        return answers, (await client.get("/metrics")).text
    return serve(make_settings(**settings), body)


def test_a_burst_answers_what_it_can_and_refuses_the_rest_early(make_settings, slow_net):
    """Side by side: today's admission by rows, one request at a time (FIFO), and goodput. A 200 is
    an answer within the deadline (past it, the engine drops the request: 504); a 503 is a refusal
    decided before the deadline (a request whose deadline has passed is dropped, not judged)."""
    old, _ = burst(make_settings, goodput=False)
    fifo, _ = burst(make_settings, goodput=False, admission="fifo", max_batch_rows=8)
    new, metrics = burst(make_settings)
    count = lambda answers, code: sum(r.status_code == code for r in answers[:-1])  # noqa: E731
    assert count(old, 200) < count(fifo, 200)  # the collapse: admitted together, late together
    assert count(new, 200) >= count(fifo, 200) >= 1
    assert count(new, 504) == 0 and count(new, 200) + count(new, 503) == 16  # the rest refused, none timed out
    refused = [r for r in new[:-1] if r.status_code == 503]
    assert all(int(r.headers["retry-after"]) >= 1 and "deadline" in r.json()["detail"] for r in refused)
    assert new[-1].status_code == 200  # a long deadline beside the burst still completes
    assert 'diffusion_refusals_total{model="tiny-digits",reason="deadline"}' in metrics
    assert 'diffusion_goodput_total{model="tiny-digits",on_time="true"}' in metrics
    assert "diffusion_prediction_ratio_bucket" in metrics


def test_an_impossible_deadline_is_refused_at_once_in_every_api_shape(make_settings, slow_net):
    async def body(app, client):
        assert (await client.post("/generate", json={**BURST, "seed": 1})).status_code == 200  # calibrated
        native = await client.post("/generate", json={**BURST, "timeout_s": 0.05})
        stream = await client.post("/generate", json={**BURST, "timeout_s": 0.05, "stream": True})
        openai = await client.post("/v1/images/generations", json={"prompt": "seven", "n": 8, "steps": 4,
                                                                   "timeout_s": 0.05})
        bulk = await client.post("/generate", json={**BURST, "bulk": True, "seed": 2})
        too_long = await client.post("/generate", json={**BURST, "timeout_s": 10_000})
        both = await client.post("/generate", json={**BURST, "timeout_s": 5, "bulk": True})
        return native, stream, openai, bulk, too_long, both

    native, stream, openai, bulk, too_long, both = serve(make_settings(max_images=8), body)
    # Infeasible as asked (not overload): a 422 naming timeout_s, no Retry-After; OpenAI's 400 naming it.
    assert native.status_code == 422 and "retry-after" not in native.headers
    assert native.json()["detail"][0]["field"] == "timeout_s" and "even alone" in native.json()["detail"][0]["msg"]
    assert stream.status_code == 422 and "deadline" in stream.json()["detail"][0]["msg"]
    assert openai.status_code == 400 and openai.json()["error"]["param"] == "timeout_s"
    assert "cannot finish" in openai.json()["error"]["message"]
    assert bulk.status_code == 200  # no deadline: never refused for one
    assert too_long.status_code == 422 and too_long.json()["detail"][0]["field"] == "timeout_s"
    assert both.status_code == 422 and both.json()["detail"][0]["field"] == "bulk"
