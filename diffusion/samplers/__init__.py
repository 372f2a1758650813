"""The sampler registry: one algorithm per file, every sampler stateless over a per-row state.

A row's sampler is stored in the state as its index in this registry (``RowState.kind``)."""

from diffusion.samplers.base import RowState, Sampler
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
KINDS: tuple[str, ...] = tuple(SAMPLERS)  # RowState.kind -> sampler name


def get_sampler(name: str) -> Sampler:
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; expected one of {', '.join(SAMPLERS)}") from None


def kind_of(name: str) -> int:
    get_sampler(name)
    return KINDS.index(name)


__all__ = ["KINDS", "SAMPLERS", "RowState", "Sampler", "get_sampler", "kind_of"]
