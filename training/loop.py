"""The DDPM training loop (Ho et al. 2020, Algorithm 1) with EMA, AdamW, warm-up, gradient
clipping, bf16 autocast on GPU, condition dropout for classifier-free guidance, exact resume and
DDP (``torchrun --nproc_per_node N -m training ...``; rank 0 writes)."""

from __future__ import annotations

import copy
import csv
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from diffusion.checkpoint import save
from diffusion.models.model import DiffusionModel, ModelConfig, count_parameters, model_config
from diffusion.models.text import TextEncoderConfig
from diffusion.prediction import training_target
from diffusion.schedules import make_schedule
from training.captions import caption_for
from training.config import ARCHITECTURE_FIELDS, TrainConfig
from training.data import TensorImages, dataset_spec, load_dataset
from training.state import load_state, read_state, save_state


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_type: str) -> Dist:
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return Dist()
    import torch.distributed as dist

    dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    d = Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    if device_type == "cuda":
        torch.cuda.set_device(d.local_rank)
    return d


def build_model_config(cfg: TrainConfig, image_shape: tuple[int, int, int], class_names: tuple[str, ...]) -> ModelConfig:
    text = None
    if "text" in cfg.conditioning:
        text = TextEncoderConfig(kind=cfg.text_encoder, arch=cfg.text_arch, pretrained=cfg.text_pretrained,
                                 context_length=cfg.context_length, width=cfg.text_width, layers=cfg.text_layers,
                                 heads=max(1, cfg.text_width // 16), output_dim=cfg.text_width)
    use_class = "class" in cfg.conditioning
    mc = model_config(cfg.model, image_shape, num_classes=len(class_names) if use_class else 0,
                      class_names=class_names, text=text, schedule=cfg.schedule,
                      num_timesteps=cfg.num_timesteps, prediction=cfg.prediction,
                      default_steps=cfg.default_steps, default_guidance=cfg.default_guidance,
                      default_clip=cfg.default_clip)
    if cfg.dropout is not None:
        import dataclasses

        mc = dataclasses.replace(mc, unet=dataclasses.replace(mc.unet, dropout=cfg.dropout))
    return mc


def lr_at(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "cosine":
        progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema ← decay·ema + (1 − decay)·model, as one fused op per dtype and device (no per-tensor launch)."""
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in model.parameters()], 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def batch_indices(n: int, global_batch: int, step: int, seed: int, dist: Dist) -> torch.Tensor:
    """The dataset indices of this rank's share of ``step``'s batch: a fresh permutation per epoch
    (seeded by seed and epoch), so a resumed run sees exactly the batches an uninterrupted one would."""
    per_epoch = max(1, n // global_batch)
    epoch, within = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(seed * 100003 + epoch)
    perm = torch.randperm(n, generator=g)
    if n < global_batch:  # tiny subsets: repeat the permutation
        perm = perm.repeat(global_batch // n + 1)
    idx = perm[within * global_batch:(within + 1) * global_batch]
    return idx[dist.rank::dist.world]


class _StepBatches(torch.utils.data.Sampler):
    def __init__(self, n: int, cfg: TrainConfig, start: int, dist: Dist):
        self.n, self.cfg, self.start, self.dist = n, cfg, start, dist

    def __iter__(self):
        for step in range(self.start, self.cfg.max_steps):
            yield batch_indices(self.n, self.cfg.batch_size, step, self.cfg.seed, self.dist).tolist()

    def __len__(self) -> int:
        return self.cfg.max_steps - self.start


def batches(ds: Dataset, cfg: TrainConfig, start: int, dist: Dist):
    """(images, labels) per step from ``start``; in-memory datasets are indexed directly."""
    if isinstance(ds, TensorImages):
        for step in range(start, cfg.max_steps):
            idx = batch_indices(len(ds), cfg.batch_size, step, cfg.seed, dist)
            yield ds.images[idx], ds.labels[idx]
        return
    loader = DataLoader(ds, batch_sampler=_StepBatches(len(ds), cfg, start, dist), num_workers=cfg.num_workers)
    yield from loader


def param_groups(model: DiffusionModel, cfg: TrainConfig) -> tuple[list[dict], list[float]]:
    """The optimizer's groups and their lr multipliers: the text path (tower and projection) learns at
    lr × ``text_lr_scale``, everything else at lr. Groups are contiguous runs of the model's parameter
    order, so a training state saved with other groups still maps onto them
    (:func:`training.state.load_state`)."""
    text: set[int] = set()
    if model.text_encoder is not None:
        text = {id(p) for m in (model.text_encoder, model.text_proj) for p in m.parameters()}
    groups: list[dict] = []
    scales: list[float] = []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        scale = cfg.text_lr_scale if id(p) in text else 1.0
        if not scales or scales[-1] != scale:
            groups.append({"params": []})
            scales.append(scale)
        groups[-1]["params"].append(p)
    return groups, scales


def check_resume_compatible(saved: dict, cfg: TrainConfig) -> None:
    diffs = [f"{k}: checkpoint has {saved.get(k)!r}, now {getattr(cfg, k)!r}"
             for k in ARCHITECTURE_FIELDS if saved.get(k) != getattr(cfg, k)]
    if diffs:
        raise ValueError("cannot resume with an incompatible config: " + "; ".join(diffs))


def conditioning_inputs(model: DiffusionModel, labels: torch.Tensor, cfg: TrainConfig, step: int,
                        dist: Dist, class_names: tuple[str, ...], device) -> torch.Tensor | None:
    """The conditioning vectors of a batch, with the condition dropped (null label / empty prompt)
    with probability p_uncond for classifier-free guidance."""
    if cfg.conditioning == "none":
        return None
    b = labels.shape[0]
    drop = torch.rand(b) < cfg.p_uncond
    lab = None
    if "class" in cfg.conditioning:
        lab = torch.where(drop, torch.full_like(labels, model.null_label), labels).to(device)
    text_emb = None
    if "text" in cfg.conditioning:
        rng = random.Random(cfg.seed * 7919 + step * 31 + dist.rank)
        captions = ["" if d else caption_for(int(y), class_names, rng) for y, d in zip(labels, drop.tolist())]
        text_emb = model.encode_prompts(captions)
    return model.condition(labels=lab, text_emb=text_emb, batch=b)


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> Path:
    """Train from ``cfg``; returns the inference checkpoint's path (written by rank 0)."""
    cfg.validate()
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dist = setup_distributed(device.type)
    if device.type == "cuda" and dist.world > 1:
        device = torch.device("cuda", dist.local_rank)
    use_bf16 = cfg.bf16 if cfg.bf16 is not None else device.type == "cuda"
    out = Path(cfg.out)
    ckpt_path = out / f"{cfg.checkpoint_name()}.safetensors"
    state_path = out / f"{cfg.checkpoint_name()}.state.safetensors"

    ds = load_dataset(cfg.dataset, cfg.data_dir, "train", cfg.image_size, cfg.channels)
    if cfg.subset is not None and isinstance(ds, TensorImages):
        ds = TensorImages(ds.images[:cfg.subset], ds.labels[:cfg.subset], ds.class_names, ds.flip)
    spec = dataset_spec(cfg.dataset, cfg.image_size, cfg.data_dir, cfg.channels)
    class_names = tuple(ds.class_names)

    torch.manual_seed(cfg.seed + dist.rank)
    model = DiffusionModel(build_model_config(cfg, spec.image_shape, class_names)).to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    groups, lr_scales = param_groups(model, cfg)
    params = [p for g in groups for p in g["params"]]
    # On a GPU the fused AdamW updates every parameter in one kernel (not a few per tensor).
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=device.type == "cuda")
    start = 0
    if resume:
        if not state_path.is_file():
            raise FileNotFoundError(f"--resume: no training state at {state_path}")
        meta, tensors = read_state(state_path)
        check_resume_compatible(meta["config"], cfg)
        start = load_state(meta, tensors, model=model, ema=ema, optimizer=opt)
        if dist.world > 1:  # every rank continues its own stream from the saved one, offset by rank
            torch.manual_seed(int(torch.randint(0, 2**31, (1,)).item()) + dist.rank)

    net = model
    if dist.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:  # the same parameters: EMA, checkpoints and resume see the plain model
        net = torch.compile(net)

    schedule = make_schedule(cfg.schedule, cfg.num_timesteps)
    alphas_cumprod = schedule.alphas_cumprod.float().to(device)
    log_file = None
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
        new_log = not (resume and (out / "loss.csv").exists())
        if not new_log:  # rows past the resumed step belong to the abandoned tail of the earlier run
            _truncate_log(out / "loss.csv", start)
        log_file = open(out / "loss.csv", "w" if new_log else "a", newline="")
        writer = csv.writer(log_file)
        if new_log:
            writer.writerow(["step", "loss", "lr", "images_per_s"])
        tb = _tensorboard(out)
        print(f"training {cfg.checkpoint_name()}: {count_parameters(model)/1e6:.2f}M parameters "
              f"({count_parameters(model.unet)/1e6:.2f}M U-Net) on {device}, world {dist.world}", flush=True)

    bar = _progress(start, cfg.max_steps, enabled=progress and dist.main)
    t_start = t_last = time.perf_counter()
    seen, running = 0, None
    step = start
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick the fastest kernels once
    for step, (x0, labels) in enumerate(batches(ds, cfg, start, dist), start=start):
        model.train()
        x0 = x0.to(device, non_blocking=True)
        for group, scale in zip(opt.param_groups, lr_scales):
            group["lr"] = lr_at(cfg, step) * scale
        # Algorithm 1: t ~ Uniform({1..T}) (our index 0..T-1), ε ~ N(0, I), regress on the target.
        t = torch.randint(0, cfg.num_timesteps, (x0.shape[0],), device=device)
        eps = torch.randn_like(x0)
        ab = alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            cond = conditioning_inputs(model, labels, cfg, step, dist, class_names, device)
            out_net = net(x_t, t, cond)
        loss = F.mse_loss(out_net.float(), training_target(cfg.prediction, x0, eps, ab))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        n = step + 1
        decay = min(cfg.ema_decay, (1 + n) / (10 + n)) if cfg.ema_warmup else cfg.ema_decay
        ema_update(ema, model, decay)

        seen += x0.shape[0] * dist.world
        # The running loss stays on the device: the host reads it only when it logs (no per-step sync).
        running = loss.detach() if running is None else running.lerp_(loss.detach(), 0.02)
        over_time = cfg.time_limit is not None and time.perf_counter() - t_start >= cfg.time_limit
        if dist.world > 1 and cfg.time_limit is not None:  # every rank stops at the same step
            over_time = _any_rank(over_time, device)
        if dist.main:
            bar.update(1)
            if n % cfg.log_every == 0 or n == cfg.max_steps or over_time:
                now = time.perf_counter()
                ips = seen / max(now - t_last, 1e-9)
                t_last, seen = now, 0
                last = loss.item()
                writer.writerow([n, f"{last:.6f}", f"{lr_at(cfg, step):.3e}", f"{ips:.1f}"])
                log_file.flush()
                bar.set_postfix(loss=f"{running.item():.4f}", img_s=f"{ips:.0f}")
                if tb is not None:
                    tb.add_scalar("loss", last, n)
            if cfg.sample_every and n % cfg.sample_every == 0:
                write_sample_grid(ema, out / f"samples-{n:07d}.png", seed=cfg.seed)
            if cfg.save_every and n % cfg.save_every == 0 and n < cfg.max_steps:
                _save_all(cfg, ema, model, opt, n, ckpt_path, state_path, spec.name)
        if over_time:
            if dist.main:
                print(f"\n--time-limit {cfg.time_limit:g} s reached after step {n}", flush=True)
            break
    bar.close()
    final = max(step + 1, start)
    if dist.main:
        _save_all(cfg, ema, model, opt, final, ckpt_path, state_path, spec.name)
        if cfg.sample_every:
            write_sample_grid(ema, out / "samples-final.png", seed=cfg.seed)
        log_file.close()
    if dist.world > 1:
        import torch.distributed as tdist

        tdist.barrier()
        tdist.destroy_process_group()
    return ckpt_path


def _any_rank(flag: bool, device) -> bool:
    """True on every rank when it is True on any (ranks' clocks differ slightly)."""
    import torch.distributed as tdist

    t = torch.tensor([int(flag)], device=device)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return bool(t.item())


def _save_all(cfg, ema, model, opt, step, ckpt_path, state_path, dataset) -> None:
    prov = {"dataset": dataset, "training_steps": step, "train_config": cfg.to_dict(),
            "device": str(next(model.parameters()).device)}
    save(ema, ckpt_path, provenance=prov)
    save_state(state_path, model=model, ema=ema, optimizer=opt, step=step, config=cfg.to_dict())


def write_sample_grid(ema: DiffusionModel, path: Path, seed: int = 0, per_row: int = 8, steps: int = 50) -> None:
    """One row per class (or per class-name prompt), sampled with DDIM from the EMA weights."""
    from diffusion.pipeline import Pipeline
    from diffusion.imaging import save_grid

    pipe = Pipeline(ema, device=next(ema.parameters()).device)
    names = ema.cfg.class_names or ("",)
    rows = []
    for i, name in enumerate(names[:10]):
        kw = {"class_label": i} if ema.cfg.num_classes else ({"prompt": name} if ema.cfg.text else {})
        rows.append(pipe.generate_tensor(num_images=per_row, steps=steps, seed=seed + 1000 * i, **kw))
    save_grid(torch.cat(rows), path, nrow=per_row)


def _truncate_log(path: Path, step: int) -> None:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    kept = rows[:1] + [r for r in rows[1:] if r and int(r[0]) <= step]
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(kept)


def _progress(start: int, total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=start, disable=not enabled, unit="step", dynamic_ncols=True)


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(str(out / "tb"))
    except Exception:  # tensorboard not installed
        return None
