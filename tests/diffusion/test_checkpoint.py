import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from diffusion import CheckpointError, DiffusionModel, TextEncoderConfig, load, load_model, model_config, save

MNIST = tuple("zero one two three four five six seven eight nine".split())


@pytest.fixture(scope="module")
def text_model():
    torch.manual_seed(0)
    cfg = model_config("tiny", (1, 28, 28), class_names=MNIST, text=TextEncoderConfig(), schedule="cosine")
    return DiffusionModel(cfg).eval()


def test_round_trip_same_weights_and_outputs(tmp_path, text_model):
    path = save(text_model, tmp_path / "m.safetensors", provenance={"dataset": "mnist", "training_steps": 7})
    model, prov = load_model(path)
    assert model.cfg == text_model.cfg
    assert prov["dataset"] == "mnist" and prov["training_steps"] == 7 and "date" in prov and "code_version" in prov
    for k, v in text_model.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([3, 900])
    c1 = text_model.condition(text_emb=text_model.encode_prompts(["nine", ""]))
    c2 = model.condition(text_emb=model.encode_prompts(["nine", ""]))
    torch.testing.assert_close(text_model(x, t, c1), model(x, t, c2))


def test_metadata_is_self_describing(tmp_path, text_model):
    path = save(text_model, tmp_path / "m.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    cfg = json.loads(meta["config"])
    assert meta["format"] == "diffusion-serve/checkpoint" and meta["version"] == "1"
    assert cfg["image_shape"] == [1, 28, 28] and cfg["schedule"] == "cosine" and cfg["prediction"] == "epsilon"
    assert cfg["text"]["kind"] == "tower" and cfg["class_names"][9] == "nine" and cfg["num_timesteps"] == 1000


def test_fp16_storage_loads_back_as_float32(tmp_path, text_model):
    path = save(text_model, tmp_path / "half.safetensors", dtype=torch.float16)
    model, _ = load_model(path)
    w = model.unet.stem.weight
    assert w.dtype == torch.float32
    torch.testing.assert_close(w, text_model.unet.stem.weight, atol=1e-3, rtol=1e-3)


def test_truncated_file_refused(tmp_path, text_model):
    path = save(text_model, tmp_path / "m.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_model(path)


def test_corrupt_bytes_refused(tmp_path, text_model):
    path = save(text_model, tmp_path / "m.safetensors")
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF  # flip bits inside the tensor data
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_model(path)


def test_mismatched_weights_refused(tmp_path, text_model):
    path = save(text_model, tmp_path / "m.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    cfg = json.loads(meta["config"])
    cfg["unet"]["base_channels"] = 32  # config no longer matches the weights
    meta["config"] = json.dumps(cfg)
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    with pytest.raises(CheckpointError, match="shape|missing|unexpected"):
        load_model(bad)


def test_foreign_and_missing_files_refused(tmp_path):
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(other))
    with pytest.raises(CheckpointError, match="not a diffusion-serve checkpoint"):
        load_model(other)
    with pytest.raises(CheckpointError, match="no such"):
        load_model(tmp_path / "nope.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x80\x04pickle-ish garbage")
    with pytest.raises(CheckpointError):
        load_model(junk)


def test_pipeline_generate_images(tmp_path, text_model):
    pipe = load(str(save(text_model, tmp_path / "m.safetensors")), device="cpu")
    imgs = pipe.generate(prompt="nine", scheduler="dpmpp_2m", steps=3, guidance=2.0, seed=1, num_images=2)
    assert len(imgs) == 2 and imgs[0].size == (28, 28) and imgs[0].mode == "L"
    again = pipe.generate(prompt="nine", scheduler="dpmpp_2m", steps=3, guidance=2.0, seed=1, num_images=1)
    assert list(again[0].getdata()) == list(imgs[0].getdata())
    # a text model takes a class label as its class name
    assert pipe.resolve(class_label=9).prompt == "nine" and pipe.resolve(class_label="Nine").prompt == "nine"


def test_model_default_clip_is_used_and_round_trips(tmp_path):
    import dataclasses

    torch.manual_seed(0)
    cfg = dataclasses.replace(model_config("tiny", (1, 8, 8), num_classes=2, class_names=("a", "b")), default_clip="static")
    model = DiffusionModel(cfg)
    with torch.no_grad():
        for p in model.unet.parameters():  # a wild network: unclipped samples leave [-1, 1]
            p.add_(0.3 * torch.randn_like(p))
    pipe = load(str(save(model, tmp_path / "c.safetensors")), device="cpu")
    assert pipe.card.default_clip == "static"
    clipped = pipe.generate_tensor(class_label=0, steps=5, seed=0, num_images=4)
    free = pipe.generate_tensor(class_label=0, steps=5, seed=0, num_images=4, clip="none")
    assert clipped.abs().max().item() <= 1 + 1e-5 < free.abs().max().item()
