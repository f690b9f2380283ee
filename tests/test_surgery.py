"""pca_wrap: where layers go, what stays untouched, and the fallback for untraceable models."""

from __future__ import annotations

import pickle
import re

import numpy as np
import pytest
import torch
from models import (
    RESNET_TARGETS,
    Branchy,
    SharedLinear,
    Straight,
    Tokens,
    images,
    warmed_resnet,
)
from sklearn.decomposition import PCA
from torch import fx, nn

import pcasurgery as ps


def test_layers_follow_every_conv_and_linear_in_forward_order():
    net = warmed_resnet()
    wrapped = ps.pca_wrap(net)
    assert type(wrapped) is type(net) and not isinstance(wrapped, fx.GraphModule)
    layers = ps.pca_layers_of(wrapped)
    assert list(layers) == RESNET_TARGETS
    assert [type(m).__name__ for m in layers.values()] == ["Conv2DPCALayer"] * 5 + [
        "LinearPCALayer"
    ] * 2
    assert wrapped.get_submodule("layer1.0.conv1.pca") is layers["layer1.0.conv1"]
    assert layers["head"].width == 24 and layers["stem"].width == 8
    assert all(m.centering for m in layers.values())


def test_original_model_is_untouched():
    net = warmed_resnet()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    wrapped = ps.pca_wrap(net)
    assert not any(isinstance(m, ps.PCALayer) for m in net.modules())
    with torch.no_grad():
        wrapped.get_submodule("stem").weight.add_(1.0)
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("training", [False, True])
def test_wrapped_model_computes_the_original_function_before_calibration(training):
    net = warmed_resnet()
    wrapped = ps.pca_wrap(net)
    x = images(8)
    net.train(training)
    wrapped.train(training)
    torch.manual_seed(0)
    expected = net(x)
    torch.manual_seed(0)
    torch.testing.assert_close(wrapped(x), expected)


def capture_outputs(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, np.ndarray]:
    """Outputs of named modules of the original model, as sample rows (channelwise for convs)."""
    captured = {}

    def hook(name):
        def fn(module, args, out):
            rows = out.permute(0, 2, 3, 1).reshape(-1, out.shape[1]) if out.dim() == 4 else out
            captured.setdefault(name, []).append(rows.detach().double().numpy())

        return fn

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    with torch.no_grad():
        model.eval()(x)
    for h in handles:
        h.remove()
    return {k: np.concatenate(v) for k, v in captured.items()}


@pytest.mark.parametrize("threshold", [0.8, 0.95, 0.99])
def test_idim_per_layer_equals_sklearn_on_captured_activations(threshold):
    """Layers are calibrated one at a time so that each sees the original model's activations."""
    net = warmed_resnet()
    x = images(96)
    acts = capture_outputs(net, RESNET_TARGETS, x)
    for name in RESNET_TARGETS:
        wrapped = ps.pca_wrap(net, threshold, include=name)
        ps.calibrate(wrapped, x.split(32), progress=False)
        layer = ps.pca_layers_of(wrapped)[name]
        expected = PCA(n_components=threshold, svd_solver="full").fit(acts[name]).n_components_
        assert layer.in_dim == expected, name
        np.testing.assert_allclose(layer.mean.numpy(), acts[name].mean(0), rtol=1e-5, atol=1e-6)


def test_threshold_one_reproduces_the_original_outputs():
    net = warmed_resnet()
    wrapped = ps.pca_wrap(net, 1.0)
    ps.calibrate(wrapped, images(64).split(16), progress=False)
    x = images(8, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x), net(x), atol=1e-4, rtol=1e-4)
    assert all(layer.in_dim == layer.fs_dim for layer in ps.pca_layers_of(wrapped).values())


def test_projection_changes_outputs_below_threshold_one():
    net = warmed_resnet()
    wrapped = ps.pca_wrap(net, 0.6)
    ps.calibrate(wrapped, images(64).split(16), progress=False)
    x = images(8, seed=5)
    with torch.no_grad():
        assert (wrapped(x) - net(x)).abs().max() > 1e-3


def test_targets_include_exclude_priority():
    net = warmed_resnet()
    only_linear = ps.pca_wrap(net, targets=nn.Linear)
    assert list(ps.pca_layers_of(only_linear)) == ["head", "fc"]
    blocks = ps.pca_wrap(net, include="layer1.*")
    assert list(ps.pca_layers_of(blocks)) == RESNET_TARGETS[1:5]
    # exclude wins over include
    some = ps.pca_wrap(net, include=["layer1.*", "fc"], exclude="*.conv2")
    assert list(ps.pca_layers_of(some)) == ["layer1.0.conv1", "layer1.1.conv1", "fc"]


def test_a_shared_module_gets_one_layer_fed_by_every_call():
    torch.manual_seed(0)
    net = SharedLinear().eval()
    wrapped = ps.pca_wrap(net, include="shared")
    x = torch.randn(50, 6)
    torch.testing.assert_close(wrapped(x), net(x))
    ps.calibrate(wrapped, [x], progress=False)
    (layer,) = ps.pca_layers_of(wrapped).values()
    assert int(layer.sample_count) == 100  # two calls per example
    assert ps.layers.sites_of(wrapped)[0].layer_path == "shared.pca"


def test_linear_on_tokens():
    torch.manual_seed(0)
    net = Tokens().eval()
    wrapped = ps.pca_wrap(net, 1.0)
    x = torch.randn(20, 9, 5)
    ps.calibrate(wrapped, [x], progress=False)
    layer = ps.pca_layers_of(wrapped)["proj"]
    assert layer.samples == 20 and int(layer.sample_count) == 180
    torch.testing.assert_close(wrapped(x), net(x), atol=1e-5, rtol=1e-5)


def test_untraceable_model_is_wrapped_the_same_way_and_behaves_the_same():
    torch.manual_seed(0)
    branchy = Branchy().eval()
    straight = Straight().eval()
    straight.load_state_dict(branchy.state_dict())
    hooked = ps.pca_wrap(branchy, 0.9)  # fx cannot trace it: only the order is registration order
    traced = ps.pca_wrap(straight, 0.9)
    assert type(hooked) is Branchy and isinstance(hooked.a, nn.Linear)
    assert (
        type(hooked.a).__name__ == "ProjectedLinear"
        and hooked.a.pca is ps.pca_layers_of(hooked)["a"]
    )
    sites = ps.layers.sites_of(hooked)
    assert [(s.name, s.layer_path, s.follows, s.attachment) for s in sites] == [
        ("a", "a.pca", "a", "module"),
        ("b", "b.pca", "b", "module"),
    ]
    assert list(ps.pca_layers_of(hooked)) == list(ps.pca_layers_of(traced)) == ["a", "b"]
    x = torch.randn(40, 4)
    torch.testing.assert_close(hooked(x), branchy(x))  # uncalibrated: the original function
    for model in (hooked, traced):
        ps.calibrate(model, x.split(10), progress=False)
    torch.testing.assert_close(hooked(x), traced(x))
    assert [m.in_dim for m in ps.pca_layers_of(hooked).values()] == [
        m.in_dim for m in ps.pca_layers_of(traced).values()
    ]
    clone = pickle.loads(pickle.dumps(hooked))
    torch.testing.assert_close(clone(x), hooked(x))


def test_wrapped_state_dict_round_trips_into_a_fresh_wrap():
    net = warmed_resnet()
    wrapped = ps.pca_wrap(net, 0.9)
    ps.calibrate(wrapped, images(64).split(16), progress=False)
    fresh = ps.pca_wrap(net, 0.5)
    fresh.load_state_dict(wrapped.state_dict())
    x = images(4, seed=9)
    torch.testing.assert_close(fresh(x), wrapped(x))
    assert ps.report(fresh).equals(ps.report(wrapped))


def test_bad_arguments_are_named():
    net = warmed_resnet()
    with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\]"):
        ps.pca_wrap(net, 2.0)
    with pytest.raises(
        TypeError, match=r"targets must be layer classes .*nn.ConvTranspose2d.*ReLU"
    ):
        ps.pca_wrap(net, targets=nn.ReLU)
    with pytest.raises(ValueError, match="no module of model matches"):
        ps.pca_wrap(net, include="nothing.*")
    with pytest.raises(TypeError, match="include must be a glob string"):
        ps.pca_wrap(net, include=[3])
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        ps.pca_wrap("resnet")
    with pytest.raises(ValueError, match="already contains PCA layers"):
        ps.pca_wrap(ps.pca_wrap(net))


def test_modules_used_only_through_their_weights_get_no_layer():
    from models import Attention

    torch.manual_seed(0)
    net = Attention().eval()
    # with add_zero_attn it cannot be split into Linear projections (see test_attention.py)
    net.att = nn.MultiheadAttention(16, 2, batch_first=True, add_zero_attn=True).eval()
    with pytest.warns(UserWarning) as caught:
        wrapped = ps.pca_wrap(net, 1.0)
    messages = [str(w.message) for w in caught]
    assert any(m.endswith("as nn.MultiheadAttention uses out_proj's weight), so they get no "
                          "PCA layer:\n  - att.out_proj") for m in messages), messages  # fmt: skip
    assert any("MultiheadAttention (" in m and "no PCA layer can follow" in m for m in messages)
    assert list(ps.pca_layers_of(wrapped)) == ["inp", "out"]
    x = torch.randn(6, 5, 8)
    ps.calibrate(wrapped, [x], progress=False)
    torch.testing.assert_close(wrapped(x), net(x), atol=1e-5, rtol=1e-5)


class RareBranch(Branchy):
    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.b(h) if h.sum() > 1e9 else h[:, :3]  # b never runs on these data


def test_calibration_names_layers_that_saw_no_data():
    torch.manual_seed(0)
    hooked = ps.pca_wrap(RareBranch().eval(), 0.9)
    with pytest.raises(ValueError, match=r"PCA layers b saw no data: .* exclude"):
        ps.calibrate(hooked, [torch.randn(8, 4)], progress=False)


def test_a_transformer_layer_wraps_calibrates_and_compresses():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, dropout=0.0).eval()
    wrapped = ps.pca_wrap(layer, 0.95)  # its attention is split into Linear projections
    assert list(ps.pca_layers_of(wrapped))[-2:] == ["linear1", "linear2"]
    assert len(ps.pca_layers_of(wrapped)) == 6
    x = torch.randn(8, 7, 16)  # 56 tokens: more rows than any layer is wide
    ps.calibrate(wrapped, [x], progress=False)
    small = ps.compress(wrapped)
    torch.testing.assert_close(small(x), wrapped(x), atol=1e-4, rtol=1e-4)


def test_module_level_wrapping_covers_every_registration_and_loads_old_checkpoints():
    class Aliased(Branchy):
        """The same Linear registered under two names, called through both."""

        def __init__(self):
            super().__init__()
            self.alias = self.a

        def forward(self, x):
            h = self.a(x) + self.alias(x)
            if h.sum() > -1e9:
                h = torch.relu(h)
            return self.b(h)

    torch.manual_seed(0)
    model = Aliased().eval()
    wrapped = ps.pca_wrap(model, 0.5)
    assert wrapped.alias is wrapped.a and type(wrapped.a).__name__ == "ProjectedLinear"
    assert list(ps.pca_layers_of(wrapped)) == ["a", "b"]
    x = torch.randn(64, 4)
    ps.calibrate(wrapped, [x], progress=False)
    assert ps.pca_layers_of(wrapped)["a"].samples == 128  # both calls
    # the state_dict keys are the model's own, plus each PCA layer's under <module>.pca
    old_layout = wrapped.state_dict()
    assert "a.weight" in old_layout and "a.pca.eigenvalues" in old_layout
    fresh = ps.pca_wrap(model, 0.5)
    fresh.load_state_dict(old_layout)
    torch.testing.assert_close(fresh.eval()(x), wrapped.eval()(x))


def test_wide_layers_are_announced_before_anything_is_allocated(monkeypatch):
    import warnings

    from pcasurgery.surgery import wrap

    net = nn.Sequential(nn.Linear(4, 600), nn.Linear(600, 30))
    assert wrap.layer_bytes(600) == 600 * 600 * 28
    monkeypatch.setattr(wrap, "LARGE_BYTES", 10_000_000)  # the 600-wide layer: 10.1 MB
    real = wrap._make_layer
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        seen_at_allocation = []

        def make(*args, **kwargs):
            seen_at_allocation.append(len(caught))
            return real(*args, **kwargs)

        monkeypatch.setattr(wrap, "_make_layer", make)
        ps.pca_wrap(net)
    assert seen_at_allocation == [1, 1]  # the warning came before the first layer
    assert re.search(r"hold up to 0\.0 GiB .*\n  - 0: width 600, 0\.01 GiB", str(caught[0].message))
    monkeypatch.setattr(wrap, "LARGE_BYTES", 1 << 30)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ps.pca_wrap(net)  # quiet below the limit


def test_a_sharing_copy_holds_the_named_modules_parameters_but_never_a_tied_one():
    from pcasurgery.layers.sites import copy_sharing

    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4))
    net[2].weight = net[1].weight
    out = copy_sharing(net, [net[0], net[1]])
    assert out[0].weight is net[0].weight and out[0].bias is net[0].bias
    assert out[1].bias is net[1].bias
    assert out[1].weight is not net[1].weight  # tied to net[2]'s: copied, still tied
    assert out[1].weight is out[2].weight
    assert out[2].bias is not net[2].bias
    torch.testing.assert_close(out[2].bias, net[2].bias)
