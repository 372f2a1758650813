"""diffusion: the core library (schedules, U-Net, text encoder, samplers, guidance, edits, checkpoints).

    import diffusion
    sched = diffusion.make_schedule("cosine", 1000)
    x = diffusion.sample(eps_model, sched, (16, 1, 28, 28), sampler="ddim", steps=50, seed=0)
    pipe = diffusion.load("checkpoints/mnist-text-compact.safetensors")   # or a diffusers folder
    images = pipe.generate(prompt="nine", scheduler="dpmpp_2m", steps=20, guidance=2.0, seed=0)
    edited = pipe.generate(prompt="nine", image=digit, mask=mask, strength=0.8, seed=0)

Imports only third-party packages: never ``training`` or ``service``.
"""

from diffusion.checkpoint import CheckpointError, UnsupportedModel, read_checkpoint, save
from diffusion.loading import load_model
from diffusion.models.card import Condition, ConditionError, Model, ModelCard
from diffusion.models.model import DiffusionModel, ModelConfig, count_parameters, model_config
from diffusion.models.text import TextEncoderConfig
from diffusion.pipeline import Pipeline, load
from diffusion.runner import Acceleration, Runner
from diffusion.samplers import SAMPLERS, get_sampler
from diffusion.sampling import sample
from diffusion.schedules import Schedule, make_schedule, sampling_timesteps
from diffusion.table import RowRequest

__all__ = [
    "SAMPLERS", "Acceleration", "CheckpointError", "Condition", "ConditionError", "DiffusionModel", "Model",
    "ModelCard", "ModelConfig",
    "Pipeline", "RowRequest", "Runner", "Schedule", "TextEncoderConfig", "count_parameters", "get_sampler", "load",
    "load_model", "make_schedule", "model_config", "read_checkpoint", "sample", "sampling_timesteps", "save",
    "UnsupportedModel",
]
