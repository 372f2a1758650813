"""The training loop on real MNIST digits from ../shared/data (tiny model, CPU)."""

import copy
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import diffusion
from training.config import PRESETS, TrainConfig
from training.loop import train

ROOT = Path(__file__).resolve().parents[2]


def _cfg(mnist_dir, out, **kw):
    base = dict(PRESETS["smoke"], data_dir=str(mnist_dir), out=str(out), log_every=1, sample_every=0,
                save_every=0, seed=3, lr=1e-3, warmup_steps=5)
    base.update(kw)
    return TrainConfig(**base)


def _losses(out: Path) -> list[float]:
    with open(out / "loss.csv") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def test_tiny_text_model_trains_and_checkpoint_samples(mnist_dir, tmp_path):
    cfg = _cfg(mnist_dir, tmp_path, conditioning="text", max_steps=25, batch_size=8)
    path = train(cfg, progress=False)
    pipe = diffusion.load(str(path), device="cpu")
    assert pipe.card.text_conditional and pipe.card.class_names[9] == "nine"
    assert pipe.provenance["training_steps"] == 25 and pipe.provenance["dataset"] == "mnist"
    imgs = pipe.generate(prompt="nine", steps=4, seed=0, num_images=2)
    assert len(imgs) == 2 and imgs[0].size == (28, 28)
    assert (tmp_path / f"{cfg.checkpoint_name()}.state.safetensors").is_file()


def test_loss_falls_on_a_tiny_subset(mnist_dir, tmp_path):
    cfg = _cfg(mnist_dir, tmp_path, max_steps=120, batch_size=8, subset=64)
    train(cfg, progress=False)
    losses = _losses(tmp_path)
    assert len(losses) == 120
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < 0.6 * first, (first, last)


def test_resume_reproduces_the_uninterrupted_run(mnist_dir, tmp_path):
    full = _cfg(mnist_dir, tmp_path / "full", max_steps=16, batch_size=8, conditioning="text")
    train(full, progress=False)
    part = _cfg(mnist_dir, tmp_path / "part", max_steps=8, batch_size=8, conditioning="text")
    train(part, progress=False)
    with open(tmp_path / "part" / "loss.csv", "a") as f:  # a crashed run's tail past the saved state
        f.write("9,123.0,1e-3,1.0\n")
    resumed = _cfg(mnist_dir, tmp_path / "part", max_steps=16, batch_size=8, conditioning="text")
    train(resumed, resume=True, progress=False)
    a, b = _losses(tmp_path / "full"), _losses(tmp_path / "part")
    assert len(a) == len(b) == 16
    assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
    ck = diffusion.read_checkpoint(tmp_path / "part" / f"{resumed.checkpoint_name()}.safetensors")
    assert ck[1]["training_steps"] == 16


def test_time_limit_stops_early_and_saves(mnist_dir, tmp_path):
    cfg = _cfg(mnist_dir, tmp_path, max_steps=100_000, batch_size=4, time_limit=1.5, log_every=1000)
    path = train(cfg, progress=False)
    steps = diffusion.read_checkpoint(path)[1]["training_steps"]
    assert 1 <= steps < 100_000
    rows = list(csv.DictReader(open(tmp_path / "loss.csv")))
    assert int(rows[-1]["step"]) == steps  # the last step is logged even between log_every rows
    assert (tmp_path / f"{cfg.checkpoint_name()}.state.safetensors").is_file()


def test_ema_update_is_the_elementwise_lerp():
    from training.loop import ema_update

    model, ema = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = [p.detach().clone() for p in ema.parameters()]
    ema_update(ema, model, 0.9)
    for e, b, m in zip(ema.parameters(), before, model.parameters()):
        assert torch.allclose(e, 0.9 * b + 0.1 * m.detach())


def test_resume_with_incompatible_config_refused(mnist_dir, tmp_path):
    train(_cfg(mnist_dir, tmp_path, max_steps=2, batch_size=4, name="run"), progress=False)
    other = _cfg(mnist_dir, tmp_path, max_steps=4, batch_size=4, schedule="cosine", name="run")
    with pytest.raises(ValueError, match="incompatible config: schedule"):
        train(other, resume=True, progress=False)


def _cli(*args, env_extra=None, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "training", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=timeout)


@pytest.mark.parametrize("args,message", [
    (["--dataset", "cifar"], "unknown dataset"),
    (["--preset", "nope"], "invalid choice"),
    (["--dataset", "mnist", "--data-dir", "/nonexistent/dir"], "does not exist"),
    (["--model", "huge"], "unknown model size"),
    (["--device", "cuda"], "no CUDA GPU"),
    (["--bf16", "true", "--device", "cpu"], "needs a CUDA GPU"),
    (["--dataset", "imagefolder"], "needs --data-dir"),
    (["--max-steps", "0"], "max_steps"),
])
def test_bad_input_refused_before_work(args, message, tmp_path):
    r = _cli(*args, "--out", str(tmp_path / "o"), timeout=120)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr
    assert not (tmp_path / "o").exists()


def test_malformed_data_dir_and_unwritable_out(tmp_path, mnist_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    r = _cli("--dataset", "mnist", "--data-dir", str(empty), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "no train IDX files" in r.stderr
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip")
    (bad / "train-labels-idx1-ubyte.gz").write_bytes(b"not gzip")
    r = _cli("--dataset", "mnist", "--data-dir", str(bad), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "cannot read IDX" in r.stderr
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = _cli("--dataset", "mnist", "--data-dir", str(mnist_dir), "--out", str(blocker))
    assert r.returncode == 2 and "not writable" in r.stderr


def test_torchrun_two_processes_gloo(mnist_dir, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
                        "-m", "training", "--preset", "smoke", "--data-dir", str(mnist_dir), "--out", str(tmp_path),
                        "--max-steps", "6", "--batch-size", "8"],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    written = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert written == ["mnist-class-tiny-linear.safetensors", "mnist-class-tiny-linear.state.safetensors"]
    assert r.stdout.count("checkpoint:") == 1  # rank 0 alone reports and writes
    assert diffusion.read_checkpoint(tmp_path / written[0])[1]["training_steps"] == 6


def test_text_path_gets_its_own_lr_group(tmp_path):
    from training.loop import build_model_config, param_groups
    from training.state import load_state, read_state, save_state

    digits = tuple(str(i) for i in range(10))
    cfg = TrainConfig(**dict(PRESETS["smoke"], conditioning="text", text_lr_scale=5.0))
    model = diffusion.DiffusionModel(build_model_config(cfg, (1, 28, 28), digits))
    groups, scales = param_groups(model, cfg)
    trainable = [p for p in model.parameters() if p.requires_grad]
    flat = [p for g in groups for p in g["params"]]
    assert scales == [1.0, 5.0] and [id(p) for p in flat] == [id(p) for p in trainable]  # same order
    text = {id(p) for m in (model.text_encoder, model.text_proj) for p in m.parameters()}
    assert {id(p) for p in groups[1]["params"]} == text
    class_model = diffusion.DiffusionModel(build_model_config(TrainConfig(**PRESETS["smoke"]), (1, 28, 28), digits))
    assert param_groups(class_model, cfg)[1] == [1.0]

    # a training state written with one group (before the text group existed) resumes onto two
    old = torch.optim.AdamW(trainable, lr=1e-3)
    for p in trainable:
        p.grad = torch.randn_like(p)
    old.step()
    ema = copy.deepcopy(model)
    save_state(tmp_path / "s.safetensors", model=model, ema=ema, optimizer=old, step=1, config={})
    new = torch.optim.AdamW(groups, lr=1e-3)
    meta, tensors = read_state(tmp_path / "s.safetensors")
    load_state(meta, tensors, model=model, ema=ema, optimizer=new)
    for p in trainable:
        torch.testing.assert_close(new.state[p]["exp_avg"], old.state[p]["exp_avg"])
    # ... and that two-group state resumes onto one group again (text_lr_scale back at 1)
    save_state(tmp_path / "s2.safetensors", model=model, ema=ema, optimizer=new, step=2, config={})
    one_groups, one_scales = param_groups(model, TrainConfig(**dict(PRESETS["smoke"], conditioning="text")))
    assert one_scales == [1.0]
    one = torch.optim.AdamW(one_groups, lr=1e-3)
    meta, tensors = read_state(tmp_path / "s2.safetensors")
    load_state(meta, tensors, model=model, ema=ema, optimizer=one)
    for p in trainable:
        torch.testing.assert_close(one.state[p]["exp_avg_sq"], old.state[p]["exp_avg_sq"])
