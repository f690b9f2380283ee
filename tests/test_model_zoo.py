"""A zoo of tiny architectures, each through the whole workflow.

wrap -> calibrate -> compress (equal to the projecting model) -> save as
safetensors and load into a fresh instance -> export to ONNX (checked in
onnxruntime), with the model's class and its own methods kept.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from models import GPT2Block, warmed_resnet
from test_llm_workflow import TinyLlama, token_batches
from torch import nn

import pcasurgery as ps


class DepthwiseSeparable(nn.Module):
    """MobileNet's block: a depthwise 3x3 conv, a pointwise conv, BatchNorm, ReLU."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.pointwise = nn.Conv2d(16, 24, 1)
        self.bn = nn.BatchNorm2d(24)
        self.head = nn.Linear(24, 5)

    def features(self, x):
        h = torch.relu(self.stem(x))
        return torch.relu(self.bn(self.pointwise(torch.relu(self.depthwise(h)))))

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


class Encoder(nn.Module):
    """nn.TransformerEncoderLayer (nn.MultiheadAttention inside) and a classifier."""

    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, dropout=0.0)
        self.head = nn.Linear(16, 3)

    def features(self, x):
        return self.layer(x)

    def forward(self, x):
        return self.head(self.features(x).mean(1))


class SwinStyle(nn.Module):
    """Attention whose qkv and proj run through F.linear on the modules' weights, as Swin's do."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(16, 48)
        self.proj = nn.Linear(16, 16)
        self.mlp = nn.Linear(16, 16)

    def features(self, x):
        q, k, v = F.linear(x, self.qkv.weight, self.qkv.bias).chunk(3, dim=-1)
        att = torch.softmax(q @ k.transpose(-1, -2) / 4.0, dim=-1) @ v
        x = x + F.linear(att, self.proj.weight, self.proj.bias)
        return x + self.mlp(x)

    def forward(self, x):
        return self.features(x)


class GPT2Like(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = GPT2Block()

    def features(self, x):
        return self.block(x)

    def forward(self, x):
        return self.features(x)


def zoo():
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g)

    tokens = token_batches(3)
    return {
        "resnet": (warmed_resnet, [rand(16, 3, 16, 16) for _ in range(3)], None),
        "depthwise": (DepthwiseSeparable, [rand(8, 3, 8, 8) for _ in range(3)], "features"),
        "attention": (Encoder, [rand(8, 7, 16) for _ in range(3)], "features"),
        "swin-style": (SwinStyle, [rand(8, 7, 16) for _ in range(3)], "features"),
        "gpt2-conv1d": (GPT2Like, [rand(8, 12, 16) for _ in range(3)], "features"),
        "llama-tied": (TinyLlama, tokens, None),
    }


@pytest.mark.parametrize("name", list(zoo()))
def test_every_architecture_wraps_calibrates_compresses_and_exports(name, tmp_path):
    build, data, method = zoo()[name]
    torch.manual_seed(0)
    model = build().eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wrapped = ps.pca_wrap(model, 0.95)
    messages = " ".join(str(w.message) for w in caught)
    assert type(wrapped) is type(model)
    if name == "swin-style":  # F.linear on a module's weight: followed at those calls
        assert "never called as modules" not in messages
        assert list(ps.pca_layers_of(wrapped)) == ["qkv", "proj", "mlp"]
        assert [s.attachment for s in ps.layers.sites_of(wrapped)] == [
            "function",
            "function",
            "module",
        ]
    if name == "llama-tied":
        assert "lm_head (shares a parameter with embed_tokens)" in messages
    if name == "attention":
        assert "layer.self_attn.q_proj" in ps.pca_layers_of(wrapped)
    ps.calibrate(wrapped, data, progress=False)
    small = ps.compress(wrapped)
    assert type(small) is type(model)
    example = data[0]
    args, kwargs = ((), example) if isinstance(example, dict) else ((example[:3],), {})
    with torch.no_grad():
        torch.testing.assert_close(small(*args, **kwargs), wrapped(*args, **kwargs),
                                   atol=1e-4, rtol=1e-4)  # fmt: skip
        if method is not None:  # the model's own methods run the smaller layers
            torch.testing.assert_close(getattr(small, method)(*args), getattr(wrapped, method)(*args),
                                       atol=1e-4, rtol=1e-4)  # fmt: skip
    if set(small.compression_report["action"]) <= {"factorised", "folded"}:
        assert ps.count_params(small) <= ps.count_params(model)
    # shipped without a pickle: safetensors + the record, loaded into a fresh instance
    ps.save_compressed(small, tmp_path / f"{name}.safetensors")
    torch.manual_seed(1)
    loaded = ps.load_compressed(build().eval(), tmp_path / f"{name}.safetensors")
    assert ps.count_params(loaded) == ps.count_params(small)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(*args, **kwargs), small(*args, **kwargs), atol=1e-6, rtol=1e-6
        )
    ps.export_onnx(small, example if isinstance(example, dict) else example[:3],
                   tmp_path / f"{name}.onnx")  # fmt: skip


@pytest.mark.parametrize("remove", [0.2, 0.4])
@pytest.mark.parametrize("name", [*zoo(), "mobilenet-se"])
def test_every_architecture_loses_what_the_plan_promises(name, remove):
    from test_budget import MobileNetStyle

    if name == "mobilenet-se":
        g = torch.Generator().manual_seed(0)
        build, data = (
            (lambda: MobileNetStyle(squeeze_excite=True)),
            [torch.randn(16, 3, 8, 8, generator=g) for _ in range(3)],
        )
    else:
        build, data, _ = zoo()[name]
    torch.manual_seed(0)
    model = build().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a tied output layer left alone
        wrapped = ps.calibrate(ps.pca_wrap(model, 0.99), data, progress=False)
    plan = ps.budget_plan(wrapped, remove=remove)
    ps.apply_plan(wrapped, plan)
    small = ps.compress(wrapped)
    promised = int((plan["params_before"] - plan["params_after"]).sum())
    assert ps.count_params(model) - ps.count_params(small) == promised
    assert promised >= remove * plan["params_before"].sum() > 0
