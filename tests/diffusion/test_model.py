import pytest
import torch

from diffusion import ConditionError, DiffusionModel, Pipeline, TextEncoderConfig, count_parameters, model_config
from diffusion.models.unet import UNet, unet_preset


@pytest.mark.parametrize("size,low,high", [("small", 1.6e6, 2.0e6), ("large", 42e6, 55e6)])
def test_named_sizes_match_the_study(size, low, high, capsys):
    for shape in ((1, 28, 28), (3, 64, 64), (3, 128, 128)):
        n = count_parameters(UNet(unet_preset(size, shape)))
        print(f"{size} U-Net at {shape}: {n / 1e6:.2f}M parameters")
        if shape == (1, 28, 28) or size == "large":
            assert low <= n <= high, (size, shape, n)


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 64, 64), (3, 128, 128)])
def test_unet_shapes(shape):
    m = UNet(unet_preset("tiny", shape))
    x = torch.randn(2, *shape)
    assert m(x, torch.tensor([0, 999])).shape == x.shape


def test_conditioning_changes_output_and_null_branch():
    torch.manual_seed(0)
    cfg = model_config("tiny", (1, 28, 28), num_classes=10, class_names=tuple(str(i) for i in range(10)),
                       text=TextEncoderConfig())
    m = DiffusionModel(cfg)
    for p in m.unet.parameters():  # zero-initialised output layers would hide the conditioning
        p.data.add_(0.01 * torch.randn_like(p))
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([10, 10])
    c = m.condition(labels=torch.tensor([1, 2]), text_emb=m.encode_prompts(["one", "two"]))
    out = m(x[:1].expand(2, -1, -1, -1), t, c)
    assert not torch.allclose(out[0], out[1])
    null = m.null_condition()
    assert null.shape == (1, cfg.unet.emb_dim)
    assert cfg.conditioning == "class+text"


def test_resolve_prompt_and_class_label_both_ways():
    names = ("T-shirt/top", "Trouser", "Sneaker")
    class_pipe = Pipeline(DiffusionModel(model_config("tiny", (1, 28, 28), num_classes=3, class_names=names)), "cpu")
    assert class_pipe.resolve(prompt="sneaker").label == 2
    assert class_pipe.resolve(class_label="Trouser").label == 1
    with pytest.raises(ConditionError, match="unknown class"):
        class_pipe.resolve(prompt="a cat")
    with pytest.raises(ConditionError, match="out of range"):
        class_pipe.resolve(class_label=3)
    text_pipe = Pipeline(DiffusionModel(model_config("tiny", (1, 28, 28), class_names=names, text=TextEncoderConfig())), "cpu")
    assert text_pipe.resolve(class_label=2).prompt == "Sneaker"
    with pytest.raises(ConditionError, match="tokens"):
        text_pipe.resolve(prompt="word " * 40)
    with pytest.raises(ConditionError, match="either"):
        text_pipe.resolve(prompt="x", class_label=1)
