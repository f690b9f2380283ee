"""Linears the model uses through ``F.linear`` on their weights, as Swin's attention does.

References are computed apart, in float64, from the module's weights and the
PCA layer's basis and centre.
"""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

import pcasurgery as ps
from pcasurgery.core import moments as _m
from pcasurgery.layers.sites import FollowedWeight, sites_of


def window_attention(x, qkv_weight, proj_weight, qkv_bias, proj_bias):
    """Attention on the weights it is given, like torchvision's ``shifted_window_attention``."""
    q, k, v = F.linear(x, qkv_weight, qkv_bias).chunk(3, dim=-1)
    att = torch.softmax(q @ k.transpose(-1, -2) / 4.0, dim=-1) @ v
    return F.linear(att, proj_weight, proj_bias)


torch.fx.wrap("window_attention")  # the trace does not enter it, as with torchvision's Swin


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv, self.proj = nn.Linear(8, 24), nn.Linear(8, 8)
        self.unused = nn.Linear(8, 8)

    def forward(self, x):
        return x + window_attention(x, self.qkv.weight, self.proj.weight, self.qkv.bias,
                                    self.proj.bias)  # fmt: skip


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn, self.head = Attention(), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.attn(x).mean(1))


def projected(layer: ps.LinearPCALayer, y: torch.Tensor) -> torch.Tensor:
    v, c = layer.basis.double(), layer.center().double()
    return (y.double() - c) @ v @ v.T + c


def wrapped_net():
    torch.manual_seed(0)
    model = Net().eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wrapped = ps.pca_wrap(model, 0.9)
    data = [torch.randn(16, 5, 8) for _ in range(4)]
    ps.calibrate(wrapped, data, progress=False)
    return model, wrapped, data, " ".join(str(w.message) for w in caught)


def test_f_linear_on_a_weight_is_followed_even_inside_a_function_the_trace_does_not_enter():
    model, wrapped, data, messages = wrapped_net()
    sites = {s.name: s.attachment for s in sites_of(wrapped)}
    assert sites == {"attn.qkv": "function", "attn.proj": "function", "head": "module"}
    assert "- attn.unused" in messages  # neither called nor used: still left out, and said so
    qkv, proj = ps.pca_layers_of(wrapped)["attn.qkv"], ps.pca_layers_of(wrapped)["attn.proj"]
    # the statistics are those of the F.linear outputs over the calibration data
    rows = torch.cat([F.linear(x, model.attn.qkv.weight, model.attn.qkv.bias) for x in data])
    reference = torch.cov(rows.reshape(-1, 24).double().T, correction=0)
    covariance = _m.covariance(qkv.statistics())
    torch.testing.assert_close(covariance, reference, rtol=1e-5, atol=1e-7)
    # eval: every F.linear on the weights is projected
    x = torch.randn(3, 5, 8)
    w = model.attn
    q, k, v = projected(qkv, F.linear(x, w.qkv.weight, w.qkv.bias).double()).chunk(3, dim=-1)
    att = torch.softmax(q @ k.transpose(-1, -2) / 4.0, dim=-1) @ v
    out = x.double() + projected(proj, F.linear(att.float(), w.proj.weight, w.proj.bias))
    head = ps.pca_layers_of(wrapped)["head"]
    expected = projected(head, F.linear(out.float().mean(1), model.head.weight, model.head.bias))
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x).double(), expected, atol=1e-4, rtol=1e-4)
        # the same function after compression (the functions read the smaller layers' weights)
        small = ps.compress(wrapped)
        torch.testing.assert_close(small(x), wrapped(x), atol=1e-4, rtol=1e-4)
    assert not any(isinstance(p, FollowedWeight) for p in small.parameters())


def test_copies_pickles_and_checkpoints_keep_following_the_calls():
    _, wrapped, data, _ = wrapped_net()
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        expected = wrapped(x)
        clone = copy.deepcopy(wrapped)
        weight = clone.attn.qkv.weight
        assert isinstance(weight, FollowedWeight) and weight.__dict__["_pcasurgery_module"] is (
            clone.attn.qkv
        )
        torch.testing.assert_close(clone(x), expected)
        loaded = pickle.loads(pickle.dumps(wrapped))
        torch.testing.assert_close(loaded(x), expected)
        assert loaded.attn.qkv.weight.__dict__["_pcasurgery_module"] is loaded.attn.qkv
    state = wrapped.state_dict()
    assert type(state["attn.qkv.weight"]) is torch.Tensor  # plain tensors in checkpoints
    with pytest.warns(UserWarning, match="attn.unused"):
        fresh = ps.pca_wrap(Net().eval(), 0.5)
    fresh.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), expected)


def test_training_through_a_followed_weight_reaches_the_weight():
    _, wrapped, data, _ = wrapped_net()
    wrapped.train()
    for layer in ps.pca_layers_of(wrapped).values():
        layer.mode = "project"
    loss = wrapped(data[0]).square().sum()
    loss.backward()
    grad = wrapped.attn.qkv.weight.grad
    assert grad is not None and type(grad) is torch.Tensor and float(grad.abs().sum()) > 0
    product = wrapped.attn.qkv.weight * 2  # other uses give plain tensors
    assert type(product) is torch.Tensor


def test_the_wrapped_model_asks_to_be_compressed_before_export(tmp_path):
    _, wrapped, data, _ = wrapped_net()
    with pytest.raises(ValueError, match=r"attn.qkv, attn.proj through F.linear.*compress"):
        ps.export_onnx(wrapped, data[0][:2], tmp_path / "wrapped.onnx")
    ps.export_onnx(ps.compress(wrapped), data[0][:2], tmp_path / "small.onnx")  # checked


def zeroed_key_bias(x, weight, bias):
    """Swin V2's way (in torchvision's shifted_window_attention): the key's bias is zeroed."""
    bias = bias.clone()
    bias[8:16] = 0
    return F.linear(x, weight, bias)


torch.fx.wrap("zeroed_key_bias")


class OtherBias(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(8, 24)

    def forward(self, x):
        return zeroed_key_bias(x, self.qkv.weight, self.qkv.bias)


def test_calls_with_another_bias_are_followed_by_the_layer_too():
    torch.manual_seed(0)
    model = OtherBias().eval()
    wrapped = ps.pca_wrap(model, 0.9)
    data = [torch.randn(32, 8) for _ in range(3)]
    ps.calibrate(wrapped, data, progress=False)
    layer = ps.pca_layers_of(wrapped)["qkv"]
    with torch.no_grad():
        rows = torch.cat([model(x) for x in data]).double()
        reference = torch.cov(rows.T, correction=0)
        torch.testing.assert_close(_m.covariance(layer.statistics()), reference, rtol=1e-5,
                                   atol=1e-7)  # fmt: skip
        x = torch.randn(4, 8)
        torch.testing.assert_close(wrapped(x).double(), projected(layer, model(x)), atol=1e-5,
                                   rtol=1e-5)  # fmt: skip
    # compress cannot fold into a bias the model makes itself: the module stays as it was
    with pytest.warns(UserWarning, match="qkv: the model calls F.linear on its weight with a bias"):
        small = ps.compress(wrapped)
    assert small.compression_report["action"].tolist() == ["kept"]
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x))
    assert type(small.qkv) is nn.Linear
    assert ps.compression_plan(wrapped)["action"].tolist() == ["kept"]
