"""What a user would write instead, for the GPU benchmark: diffusers' UNet2DModel of the same size,
diffusers' DDIMScheduler loop with classifier-free guidance, the best a diffusers user can do (the
network compiled and the whole 50-step loop captured as ONE CUDA graph), and a plain diffusers
training step. Not a test: :mod:`bench.gpu` times these beside this project's own paths.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

# eps2(x [2B, C, H, W], t [2B] long, cond) -> raw network output [2B, C, H, W]; cond is whatever the
# network takes for the conditional rows followed by the unconditional ones.
Eps2 = Callable[[torch.Tensor, torch.Tensor, object], torch.Tensor]


def unet2d(size: str, image_shape=(1, 28, 28), num_classes: int = 10):
    """diffusers' UNet2DModel with this project's channel widths for ``size`` (small: 32-64-64, large:
    168-336-336; ResNet blocks, attention on the two lowest resolutions, class embedding + null class)."""
    from diffusers import UNet2DModel

    base, groups = {"tiny": (16, 8), "small": (32, 8), "large": (168, 24)}[size]
    c, h, _ = image_shape
    return UNet2DModel(sample_size=h, in_channels=c, out_channels=c, block_out_channels=(base, 2 * base, 2 * base),
                       layers_per_block=2, down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"), num_class_embeds=num_classes + 1,
                       norm_num_groups=groups)


def unet2d_eps2(model, bf16: bool) -> Eps2:
    """The UNet2DModel as an eps2 function; cond is the class labels of the 2B rows."""
    device_type = next(model.parameters()).device.type

    def eps2(x, t, labels):
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
            return model(x, t, class_labels=labels).sample.float()
    return eps2


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ddim_eager(eps2: Eps2, betas: torch.Tensor, x_T: torch.Tensor, cond, w: float, steps: int) -> torch.Tensor:
    """The loop a diffusers user writes: DDIMScheduler (trailing spacing, σ = 0 at the end), CFG in one
    batch of 2B rows."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(num_train_timesteps=len(betas), trained_betas=betas.cpu().numpy(), clip_sample=False,
                          set_alpha_to_one=True, timestep_spacing="trailing")
    sched.set_timesteps(steps, device=x_T.device)
    x, b = x_T, x_T.shape[0]
    for t in sched.timesteps:
        out = eps2(torch.cat([x, x]), t.reshape(1).expand(2 * b), cond)
        eps = out[:b] + w * (out[:b] - out[b:])
        x = sched.step(eps, t, x).prev_sample
    return x


class GraphedDDIM:
    """The best a diffusers user can do: the DDIM coefficients worked out once, the network compiled,
    and the whole ``steps``-step loop recorded as ONE CUDA graph over static input and output tensors
    (on a CPU the same loop simply runs)."""

    def __init__(self, eps2: Eps2, alphas_cumprod: torch.Tensor, x_T: torch.Tensor, cond, w: float, steps: int):
        self.device = x_T.device
        T = len(alphas_cumprod)
        ts = [int(round(T - k * T / steps)) - 1 for k in range(steps)]  # trailing, as DDIMScheduler above
        ab = alphas_cumprod.double().cpu()
        self.coeffs = [(float(ab[t]), float(ab[p]) if p >= 0 else 1.0) for t, p in zip(ts, ts[1:] + [-1])]
        b = x_T.shape[0]
        self.t = [torch.full((2 * b,), t, dtype=torch.long, device=self.device) for t in ts]
        self.x_in, self.x_out, self.cond, self.w, self.eps2 = x_T.clone(), torch.empty_like(x_T), cond, w, eps2
        self.graph = None

    def _loop(self) -> None:
        x, b = self.x_in, self.x_in.shape[0]
        for (a, a_prev), t in zip(self.coeffs, self.t):
            out = self.eps2(torch.cat([x, x]), t, self.cond)
            eps = out[:b] + self.w * (out[:b] - out[b:])
            x0 = (x - (1 - a) ** 0.5 * eps) / a ** 0.5
            x = a_prev ** 0.5 * x0 + (1 - a_prev) ** 0.5 * eps
        self.x_out.copy_(x)

    def capture(self) -> None:
        if self.device.type != "cuda":
            return
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._loop()
        torch.cuda.current_stream(self.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._loop()

    def __call__(self, x_T: torch.Tensor) -> torch.Tensor:
        self.x_in.copy_(x_T)
        if self.graph is not None:
            self.graph.replay()
        else:
            self._loop()
        return self.x_out


def time_it(fn: Callable[[], object], device: torch.device, repeats: int, budget_s: float = 30.0) -> list[float]:
    """Wall seconds of each call (synchronised), after one untimed call; stops early past ``budget_s``."""
    fn()
    sync(device)
    out, start = [], time.perf_counter()
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
        if time.perf_counter() - start > budget_s:
            break
    return out


def diffusers_train_speed(size: str, device: torch.device, batch: int, steps: int, bf16: bool,
                          image_shape=(1, 28, 28)) -> dict:
    """A plain diffusers UNet2DModel training step (DDPM loss, AdamW, bf16 autocast), images/s."""
    torch.manual_seed(0)
    model = unet2d(size, image_shape).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    ab = torch.linspace(0.9999, 0.0001, 1000, device=device)
    x0 = torch.randn(batch, *image_shape, device=device)
    labels = torch.randint(0, 11, (batch,), device=device)

    def step():
        t = torch.randint(0, 1000, (batch,), device=device)
        eps = torch.randn_like(x0)
        a = ab[t].view(-1, 1, 1, 1)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(a.sqrt() * x0 + (1 - a).sqrt() * eps, t, class_labels=labels).sample
        loss = torch.nn.functional.mse_loss(out.float(), eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    seconds = time.perf_counter() - t0
    return {"what": f"diffusers UNet2DModel {size}", "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
            "batch": batch, "steps": steps, "images_per_s": round(batch * steps / seconds, 1)}
