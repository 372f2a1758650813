"""The sampler registry: one algorithm per file, every sampler stateless over a per-row state."""

from diffusion.samplers.base import RowState, Sampler, cat_rows, take_rows
from diffusion.samplers.ddim import DDIM
from diffusion.samplers.ddpm import DDPM
from diffusion.samplers.dpmpp_2m import DPMSolverPP2M
from diffusion.samplers.heun import Heun
from diffusion.samplers.pndm import PNDM

SAMPLERS: dict[str, Sampler] = {
    "ddpm": DDPM(),
    "ddim": DDIM(),
    "pndm": PNDM(),
    "heun": Heun(),
    "dpmpp_2m": DPMSolverPP2M(),
}


def get_sampler(name: str) -> Sampler:
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; expected one of {', '.join(SAMPLERS)}") from None


__all__ = ["SAMPLERS", "RowState", "Sampler", "cat_rows", "get_sampler", "take_rows"]
