"""Models that change while the service runs (service/registry.py, service/api/admin.py): polled
checkpoints, reloads beside requests in flight, failed reloads, a memory budget with eviction, the
admin API and its key, aliases, and training writing into a served directory."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import diffusion
from service.registry import ModelRegistry, device_bytes, disk_bytes, safetensors_complete

from .asgi import parse_sse, serve, until
from .conftest import DIGITS

ROOT = Path(__file__).resolve().parents[2]
REQ = {"class_label": 3, "steps": 8, "seed": 5, "num_images": 2}
POLL = 0.2


def tiny(path: Path, seed: int, size: str = "tiny") -> Path:
    """A tiny class model with weights drawn from ``seed`` (two seeds: two models that draw differently)."""
    torch.manual_seed(seed)
    cfg = diffusion.model_config(size, (1, 16, 16), num_classes=10, class_names=DIGITS, num_timesteps=100,
                                 default_steps=4)
    model = diffusion.DiffusionModel(cfg)
    with torch.no_grad():  # its output layer starts at zero (every seed would draw alike): perturb every weight
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return diffusion.save(model, path)


@pytest.fixture
def served(tmp_path):
    d = tmp_path / "served"
    d.mkdir()
    tiny(d / "a.safetensors", 0)
    tiny(d / "b.safetensors", 1)
    return d


@pytest.fixture
def settings(served, make_settings):
    def make(**kw):
        return make_settings(**{"checkpoint_dir": served, "default_model": "a", "poll_s": POLL, "calibrate_s": 0, **kw})
    return make


def images(response) -> list[str]:
    assert response.status_code == 200, response.text
    if response.headers["content-type"].startswith("text/event-stream"):
        done = [data for name, data in parse_sse(response.text) if name == "done"]
        assert len(done) == 1, response.text
        return done[0]["images"]
    return response.json()["images"]


def post(client, **kw):
    return client.post("/generate", json={**REQ, **kw})


def test_training_state_and_partial_files_are_not_models(tmp_path):
    path = tiny(tmp_path / "m.safetensors", 0)
    assert safetensors_complete(path)
    (tmp_path / "m.state.safetensors").write_bytes(path.read_bytes())  # training's resumable state
    half = tmp_path / "half.safetensors"
    half.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert not safetensors_complete(half)
    half.unlink()
    registry = ModelRegistry.load(tmp_path, torch.device("cpu"))
    assert registry.names() == ["m"] and registry.entry("m").state == "resident"
    assert registry.entry("m").bytes == device_bytes(registry["m"]) > 0


def test_a_new_checkpoint_is_listed_and_served_without_a_restart(settings, served):
    async def body(app, client):
        tiny(served / "c.safetensors", 2)  # written as training writes: a temporary name, then renamed
        await until(lambda: "c" in app.state.registry.names(), "c found", tries=400, pause=POLL / 4)
        listed = (await client.get("/models")).json()
        answer = await post(client, model="c")
        return listed, answer, await post(client, model="a")

    listed, c, a = serve(settings(), body)
    assert "c" in [m["name"] for m in listed["models"]] + listed["not_loaded_yet"]
    assert c.json()["model"] == "c" and images(c) != images(a)


def test_overwriting_a_checkpoint_while_requests_stream(settings, served, gate):
    """Requests in flight at the swap finish on the old weights; every later one runs on the new; none fails."""
    async def body(app, client):
        old = images(await post(client))
        gate.clear()
        flying = [asyncio.ensure_future(post(client, stream=True))]
        await until(lambda: app.state.engine.rows_in_flight == 2, "rows in flight")
        tiny(served / "a.safetensors", 7)  # new weights under the same name
        await until(lambda: app.state.registry.entry("a").loads == 2, "reloaded", tries=1000, pause=POLL / 4)
        later = [asyncio.ensure_future(post(client, stream=k == 0)) for k in range(2)]
        await until(lambda: app.state.engine.queue_depth == 2, "later requests queued")
        gate.set()
        return (old, [images(r) for r in await asyncio.gather(*flying)],
                [images(r) for r in await asyncio.gather(*later)])

    old, flying, later = serve(settings(), body)
    assert flying == [old]
    assert later[0] == later[1] != old  # queued before the swap, admitted after it: the new weights


def test_a_truncated_replacement_keeps_the_old_weights_and_shows_the_error(settings, served):
    async def body(app, client):
        before = images(await post(client))
        path = served / "a.safetensors"
        path.write_bytes(path.read_bytes()[:1000])  # truncated in place
        await until(lambda: app.state.registry.entry("a").error is not None, "error shown", tries=1000,
                    pause=POLL / 4)
        return before, await post(client), (await client.get("/models")).json(), (await client.get("/metrics")).text

    before, after, listed, metrics = serve(settings(), body)
    assert images(after) == before
    a = next(m for m in listed["models"] if m["name"] == "a")
    assert a["state"] == "resident" and "a.safetensors" in a["error"]
    assert 'diffusion_model_load_failures_total{kind="reload",model="a"} 1.0' in metrics


def test_a_budget_of_one_model_evicts_the_idle_one_and_never_one_in_use(settings, served, gate):
    one = disk_bytes(served / "a.safetensors")

    async def body(app, client):
        registry = app.state.registry
        assert registry.entry("b").state == "available"  # did not fit beside a at start-up
        first = {m: images(await post(client, model=m)) for m in ("a", "b")}
        again = {m: images(await post(client, model=m)) for m in ("a", "b", "a")}
        evictions = (await client.get("/metrics")).text
        gate.clear()
        held = asyncio.ensure_future(post(client, model="a", stream=True))  # a is loaded (b evicted), then held
        await until(lambda: app.state.engine.rows_in_flight == 2, "a in flight")
        refused = await post(client, model="b", timeout_s=0.5)  # no room while a is in use
        assert registry.entry("a").state == "resident"
        gate.set()
        return first, again, evictions, images(await held), refused, await post(client, model="b")

    first, again, evictions, held, refused, b = serve(settings(model_memory=str(int(one * 1.5))), body)
    assert again == first and held == first["a"] and images(b) == first["b"]
    assert 'diffusion_model_evictions_total{model="a"} 2.0' in evictions
    assert 'diffusion_model_evictions_total{model="b"} 2.0' in evictions
    assert refused.status_code == 503 and int(refused.headers["retry-after"]) >= 1
    assert "loading" in refused.json()["detail"] or "no room" in refused.json()["detail"]


def test_a_model_larger_than_the_budget_is_a_clear_error(settings, served):
    tiny(served / "big.safetensors", 3, size="small")  # 6x the parameters of the others

    async def body(app, client):
        return await post(client, model="big"), await post(client, model="a"), (await client.get("/models")).json()

    big, a, listed = serve(settings(model_memory=str(3 * disk_bytes(served / "a.safetensors"))), body)
    assert big.status_code == 503 and "more than the whole model memory budget" in big.json()["detail"]
    assert a.status_code == 200 and "big" in listed["not_loaded_yet"]


def test_the_admin_api_and_its_key(settings, served):
    admin, user = {"Authorization": "Bearer adm"}, {"Authorization": "Bearer user"}

    async def body(app, client):
        out = {"none": await client.get("/admin/models"), "user": await client.get("/admin/models", headers=user)}
        out["list"] = (await client.get("/admin/models", headers=admin)).json()
        b = images(await client.post("/generate", json={**REQ, "model": "b"}, headers=user))
        out["default"] = await client.post("/admin/models/a/unload", headers=admin)
        out["unload"] = await client.post("/admin/models/b/unload", headers=admin)
        out["gone"] = await client.post("/generate", json={**REQ, "model": "b"}, headers=user)
        out["load"] = await client.post("/admin/models/b/load", headers=admin)
        out["back"] = images(await client.post("/generate", json={**REQ, "model": "b"}, headers=user)) == b
        path = served / "b.safetensors"
        path.write_bytes(path.read_bytes()[:1000])
        out["reload"] = await client.post("/admin/models/b/reload", headers=admin)
        out["still"] = images(await client.post("/generate", json={**REQ, "model": "b"}, headers=user)) == b
        tiny(served / "c.safetensors", 2)
        out["new"] = await client.post("/admin/models/c/load", headers=admin)
        out["unknown"] = await client.post("/admin/models/nope/load", headers=admin)
        out["switch"] = await client.post("/admin/models/a/unload", json={"default": "c"}, headers=admin)
        out["models"] = (await client.get("/models", headers=user)).json()
        return out

    out = serve(settings(model_control="explicit", admin_key="adm", api_keys="user"), body)
    assert out["none"].status_code == 401 and out["user"].status_code == 401  # the user key does not open it
    assert {m["name"]: m["state"] for m in out["list"]["models"]} == {"a": "resident", "b": "resident"}
    assert all(m["content_hash"] and m["bytes"] > 0 and m["load_seconds"] > 0 for m in out["list"]["models"])
    assert out["default"].status_code == 409 and "default" in out["default"].json()["detail"]
    assert out["unload"].status_code == 200 and out["unload"].json()["state"] == "unloaded"
    assert out["gone"].status_code == 404
    assert out["load"].status_code == 200 and out["load"].json()["state"] == "resident" and out["back"]
    assert out["reload"].status_code == 422 and "old weights keep serving" in out["reload"].json()["detail"]
    assert out["still"]
    assert out["new"].status_code == 200 and out["unknown"].status_code == 404
    assert out["switch"].status_code == 200 and out["models"]["default"] == "c"
    assert "a" not in [m["name"] for m in out["models"]["models"]]


def test_the_admin_api_is_off_without_its_key(settings):
    async def body(app, client):
        return await client.get("/admin/models"), await client.post("/admin/models/a/reload")

    listed, reload = serve(settings(), body)
    assert listed.status_code == 404 and reload.status_code == 404 and "admin key" in listed.json()["detail"]


def _aliases(directory: Path, mapping: dict) -> None:
    tmp = directory / ".aliases.json.tmp"
    tmp.write_text(json.dumps(mapping))
    os.replace(tmp, directory / "aliases.json")


def test_an_alias_moves_between_two_requests_never_within_one(settings, served, gate):
    _aliases(served, {"prod": "a"})

    async def body(app, client):
        ref = {m: images(await post(client, model=m)) for m in ("a", "b")}
        before = await post(client, model="prod")
        gate.clear()
        flying = asyncio.ensure_future(post(client, model="prod"))
        await until(lambda: app.state.engine.rows_in_flight == 2, "in flight")
        _aliases(served, {"prod": "b"})
        await until(lambda: app.state.registry.aliases() == {"prod": "b"}, "alias moved", tries=1000, pause=POLL / 4)
        gate.set()
        return ref, before, await flying, await post(client, model="prod"), (await client.get("/models")).json()

    ref, before, flying, after, listed = serve(settings(), body)
    assert before.json()["model"] == "a" and images(before) == ref["a"]
    assert flying.json()["model"] == "a" and images(flying) == ref["a"]
    assert after.json()["model"] == "b" and images(after) == ref["b"]
    assert listed["aliases"] == {"prod": "b"}


def test_training_into_a_served_directory_is_picked_up(settings, served, mnist_dir):
    async def body(app, client):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        run = await asyncio.to_thread(subprocess.run, [
            sys.executable, "-m", "training", "--preset", "smoke", "--data-dir", str(mnist_dir), "--out", str(served),
            "--max-steps", "2", "--time-limit", "60", "--name", "fresh"], capture_output=True, text=True, env=env,
            timeout=300)
        assert run.returncode == 0, run.stderr
        await until(lambda: "fresh" in app.state.registry.names(), "the new checkpoint served", tries=400,
                    pause=POLL / 4)
        assert "fresh.state" not in app.state.registry.names()
        return await client.post("/generate", json={"model": "fresh", "class_label": 1, "steps": 4})

    answer = serve(settings(), body)
    assert answer.status_code == 200 and answer.json()["model"] == "fresh"
    assert (served / "fresh.state.safetensors").is_file()  # training's resumable state: beside it, not a model


def test_the_engine_swaps_weights_and_keeps_or_drops_what_it_measured(served):
    """A retrained checkpoint (same architecture) keeps the cost model's measurements, under its own
    name or a new one; another architecture under a known name is measured anew."""
    from service.engine import Engine

    a = diffusion.load(str(served / "a.safetensors"), "cpu")
    engine = Engine({"a": a}, max_rows=4)
    engine.costs.observe("a", 2, 0.5)
    engine.install("a", diffusion.load(str(served / "b.safetensors"), "cpu"))  # new weights, same shape
    engine.install("c", diffusion.load(str(tiny(served / "c.safetensors", 2)), "cpu"))  # a new name
    engine.iterate()
    assert engine.costs.known("a") and engine.costs.cost("c", 2) == engine.costs.cost("a", 2) == 0.5
    engine.install("a", diffusion.load(str(tiny(served / "big.safetensors", 3, size="small")), "cpu"))
    engine.iterate()
    assert not engine.costs.known("a") and engine.costs.known("c")
    engine.remove("c")
    assert set(engine.models) == {"a"} and "c" not in engine.batches


def test_an_unload_during_a_load_ends_unloaded_and_aliases_follow_their_model(served):
    """The loader thread serialises changes: an unload asked for while the model loads wins, and a
    load after it brings the model (and the aliases that name it) back."""
    opened = threading.Event()
    opened.set()

    def slow(path, device, **kw):
        assert opened.wait(30)
        return diffusion.load(path, device, **kw)
    _aliases(served, {"prod": "b"})
    one = disk_bytes(served / "a.safetensors")
    registry = ModelRegistry.load(served, torch.device("cpu"), default="a", budget_bytes=int(one * 2.5), loader=slow)
    assert registry.entry("b").state == "resident" and registry.resolve("prod") == "b"
    registry.request_unload("b").result(30)
    assert registry.entry("b").state == "unloaded" and registry.entry("b").pipe is None
    with pytest.raises(LookupError):
        registry.resolve("prod")  # its model is out of service: so is the alias, for now
    opened.clear()
    loading = registry.request_load("b")
    unloading = registry.request_unload("b")  # while the load waits
    opened.set()
    loading.result(30), unloading.result(30)
    assert registry.entry("b").state == "unloaded" and registry.entry("b").pipe is None
    registry.request_load("b").result(30)
    assert registry.entry("b").state == "resident" and registry.resolve("prod") == "b"
    registry.close()
