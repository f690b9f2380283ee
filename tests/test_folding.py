"""Module-level attachment: the model keeps its class; inside ``ps.folded`` eval runs folded.

References are computed apart, in float64: the module's own map, then
``(y - c) V V^T + c`` from the layer's basis and centre.
"""

from __future__ import annotations

import copy
import pickle
import types

import pytest
import torch
import torch.nn.functional as F
from models import GPT2Block, reference
from torch import nn

import pcasurgery as ps
from pcasurgery.layers import folding, sites_of
from pcasurgery.layers.folding import _fold, cached_fold


class Net(nn.Module):
    """A small classifier with methods of its own, as timm and transformers models have."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 16, 10)
        self.num_classes = 10

    def forward_features(self, x):
        return torch.relu(self.conv(x)).flatten(1)

    def forward(self, x):
        return self.fc(self.forward_features(x))

    def reset_classifier(self, classes: int) -> None:
        self.fc = nn.Linear(8 * 16, classes)
        self.num_classes = classes


def calibrated_net(threshold: float = 0.9, keepdim: bool = True) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    net = Net().eval()
    wrapped = ps.pca_wrap(net, threshold, keepdim=keepdim, include="conv" if not keepdim else None)
    ps.calibrate(wrapped, [torch.randn(16, 3, 4, 4) for _ in range(4)], progress=False)
    return net, wrapped


def test_the_wrapped_model_keeps_its_class_methods_and_attributes():
    net, wrapped = calibrated_net()
    assert type(wrapped) is Net and wrapped.num_classes == 10
    x = torch.randn(2, 3, 4, 4)
    features = wrapped.forward_features(x)  # runs the projection after conv
    conv, layer = wrapped.conv, ps.pca_layers_of(wrapped)["conv"]
    expected = torch.relu(reference(conv, layer, x)).flatten(1).float()
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=1e-5)
    assert isinstance(wrapped.conv, nn.Conv2d) and type(wrapped.conv).__name__ == "ProjectedConv2d"
    small = ps.compress(wrapped)
    assert type(small) is Net
    torch.testing.assert_close(small.forward_features(x), features, atol=1e-5, rtol=1e-5)
    small.reset_classifier(3)
    assert small(x).shape == (2, 3)


@pytest.mark.parametrize("keepdim", [True, False])
def test_eval_runs_folded_and_equals_the_projection_of_the_output(keepdim):
    _, wrapped = calibrated_net(keepdim=keepdim)
    x = torch.randn(5, 3, 4, 4)
    for name in ["conv"] if not keepdim else ["conv", "fc"]:
        module = wrapped.get_submodule(name)
        layer = ps.pca_layers_of(wrapped)[name]
        inputs = x if name == "conv" else torch.randn(200, 128)
        with torch.no_grad(), ps.folded(wrapped):
            out = module(inputs)
            assert cached_fold(module) is not None  # it ran folded
        assert cached_fold(module) is None  # and the fold went with the scope
        expected = reference(module, layer, inputs).float()
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
        if not keepdim:
            assert out.shape[1] == layer.in_dim


def test_gpt2_conv1d_runs_folded_too():
    torch.manual_seed(0)
    block = GPT2Block().eval()
    wrapped = ps.pca_wrap(block, 0.9)
    ps.calibrate(wrapped, torch.randn(16, 12, 16).split(4), progress=False)
    x = torch.randn(3, 12, 16)
    module, layer = wrapped.c_fc, ps.pca_layers_of(wrapped)["c_fc"]
    with torch.no_grad(), ps.folded(wrapped):
        out = module(x)
        assert cached_fold(module) is not None
    torch.testing.assert_close(out, reference(module, layer, x).float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "conv2d", "conv1d"])
@pytest.mark.parametrize("threshold", [0.6, 1.0])
def test_few_kept_directions_run_as_the_compressed_pair_and_many_as_one_folded_map(kind, threshold):
    torch.manual_seed(1)
    if kind == "linear":
        model, x = nn.Sequential(nn.Linear(24, 32)), torch.randn(64, 24)
    elif kind == "conv2d":
        model, x = nn.Sequential(nn.Conv2d(6, 20, 3, stride=2, padding=1)), torch.randn(8, 6, 9, 9)
    else:
        model, x = GPT2Block(), torch.randn(16, 12, 16)
    features = x.shape[1] if kind == "conv2d" else x.shape[-1]
    mix = torch.randn(features, features) * torch.logspace(0, -3, features)
    data = (x.movedim(1, -1) @ mix).movedim(-1, 1) if kind == "conv2d" else x @ mix
    wrapped = ps.calibrate(ps.pca_wrap(model.eval(), threshold), [data], progress=False)
    name = {"linear": "0", "conv2d": "0", "conv1d": "c_fc"}[kind]
    module, layer = wrapped.get_submodule(name), ps.pca_layers_of(wrapped)[name]
    probe = data if kind == "linear" else data[:3]
    with torch.no_grad(), ps.folded(wrapped):
        out = module(probe)
        parts = cached_fold(module)
    assert parts is not None
    assert len(parts) == (4 if threshold < 1 else 2)  # (V^T W, V^T (b - c), V, c) or (P W, P b + q)
    torch.testing.assert_close(out, reference(module, layer, probe).float(), atol=1e-4, rtol=1e-4)


def test_the_folded_weights_follow_every_change_of_weights_and_projection():
    _, wrapped = calibrated_net()
    fc, layer = wrapped.fc, ps.pca_layers_of(wrapped)["fc"]
    x = torch.randn(200, 128)

    def check():
        with torch.no_grad(), ps.folded(wrapped):
            out = fc(x)
            assert cached_fold(fc) is not None
            expected = reference(fc, layer, x).to(x.dtype)
            torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)

    check()
    layer.threshold = 0.5
    check()
    layer.centering = False
    check()
    layer.inject_random_directions(0)
    check()
    with torch.no_grad():
        fc.weight.mul_(2.0)  # in place, as an optimiser step
        fc.bias.add_(1.0)
    check()
    fc.weight = nn.Parameter(torch.randn_like(fc.weight))  # a new tensor
    check()
    wrapped.double()
    x = x.double()
    check()


@pytest.mark.parametrize("centering", [True, False])
@pytest.mark.parametrize("widening", [False, True])
def test_a_layer_keeping_most_directions_folds_through_those_it_drops(
    widening, centering, monkeypatch
):
    # Linear(32, 24) is decomposed at its width; Linear(24, 64) through its 24 inputs
    # (and its bias, uncentred), whose eigenvectors span its map's range only while
    # the weights stay as they were
    torch.manual_seed(2)
    fan_in, width = (24, 64) if widening else (32, 24)
    module = nn.Linear(fan_in, width)
    data = torch.randn(512, fan_in) @ (torch.randn(fan_in, fan_in) * torch.logspace(0, -2, fan_in))
    wrapped = ps.pca_wrap(nn.Sequential(module).eval(), 0.999, centering=centering)
    wrapped = ps.calibrate(wrapped, [data + 3.0], progress=False)
    fc, layer = wrapped.get_submodule("0"), ps.pca_layers_of(wrapped)["0"]
    k, computed = layer.in_dim, layer.eigenvectors.shape[1]
    assert computed == (fan_in + (not centering) if widening else width)
    assert computed - k < k  # the dropped directions are the fewer
    assert layer.discarded_directions(fc).shape == (width, computed - k)

    def check():
        with torch.no_grad(), ps.folded(wrapped):
            out = fc(data)
            assert cached_fold(fc) is not None
        torch.testing.assert_close(out, reference(fc, layer, data).float(), atol=1e-4, rtol=1e-4)

    check()

    def no_room(*_):
        raise MemoryError("no room")

    with monkeypatch.context() as patch:  # a failed calibration keeps what it found
        patch.setattr(ps.pca_layers_of(wrapped)["0"], "_install_spectrum", no_room)
        patch.setattr(ps.pca_layers_of(wrapped)["0"], "_install_eigenvalues", no_room)
        with pytest.raises(MemoryError, match="no room"):
            ps.calibrate(wrapped, [data], progress=False)
    assert layer.discarded_directions(fc).shape == (width, computed - k)
    layer.load_state_dict(layer.state_dict())  # eigenvectors written in place: not trusted
    assert (layer.discarded_directions(fc) is None) == widening
    with torch.no_grad():
        fc.weight.add_(torch.randn_like(fc.weight))  # a step that leaves the old range
        fc.bias.add_(1.0)
    assert (layer.discarded_directions(fc) is None) == widening
    check()
    layer.inject_random_directions(0)
    assert layer.discarded_directions(fc) is None
    check()
    small = ps.compress(wrapped.float())
    torch.testing.assert_close(
        small(data), reference(fc, layer, data).float(), atol=1e-4, rtol=1e-4
    )


def test_the_scope_folds_when_it_opens_so_the_first_forward_builds_nothing(monkeypatch):
    _, wrapped = calibrated_net()
    assert cached_fold(wrapped.conv) is None and cached_fold(wrapped.fc) is None  # no scope
    built = []
    monkeypatch.setattr(folding, "_fold", lambda *a: built.append(a) or _fold(*a))
    x = torch.randn(2, 3, 4, 4)
    with ps.folded(wrapped):
        assert len(built) == 2
        with torch.no_grad():
            out = wrapped(x)
        assert len(built) == 2
        with ps.folded(wrapped):  # scopes nest: the inner one's end keeps the outer's folds
            pass
        assert cached_fold(wrapped.fc) is not None
    assert cached_fold(wrapped.conv) is None and cached_fold(wrapped.fc) is None
    conv, fc = wrapped.conv, wrapped.fc
    layers = ps.pca_layers_of(wrapped)
    hidden = torch.relu(reference(conv, layers["conv"], x)).flatten(1).float()
    torch.testing.assert_close(
        out, reference(fc, layers["fc"], hidden).float(), atol=1e-5, rtol=1e-5
    )
    # none where the layer collects (training) or is watched
    trained = ps.pca_wrap(Net().train(), 0.9)
    ps.calibrate(trained, [torch.randn(16, 3, 4, 4)], progress=False)
    with ps.folded(trained):
        assert cached_fold(trained.fc) is None
    watched = ps.pca_wrap(Net().eval(), 0.9)
    ps.pca_layers_of(watched)["fc"].register_forward_hook(lambda *a: None)
    ps.calibrate(watched, [torch.randn(16, 3, 4, 4)], progress=False)
    with ps.folded(watched):
        assert cached_fold(watched.fc) is None and cached_fold(watched.conv) is not None
    with pytest.raises(ValueError, match="no PCA layer"):
        with ps.folded(Net()):
            pass


def test_a_fold_that_fails_as_the_scope_opens_leaves_no_fold(monkeypatch):
    _, wrapped = calibrated_net()

    def fail(kind, module, pca):
        if module is wrapped.fc:
            raise MemoryError("no room for the fold")
        return _fold(kind, module, pca)

    monkeypatch.setattr(folding, "_fold", fail)
    with pytest.raises(MemoryError, match="no room"):
        with ps.folded(wrapped):
            pass
    assert cached_fold(wrapped.conv) is None and cached_fold(wrapped.fc) is None
    assert not folding._SCOPES


@pytest.mark.parametrize("update", ["data", "vector_to_parameters", "ema", "tie"])
def test_eval_outside_a_scope_reads_the_current_weights(update):
    """Changes that no version counter sees: a projecting forward follows them all."""
    _, wrapped = calibrated_net()
    fc, layer = wrapped.fc, ps.pca_layers_of(wrapped)["fc"]
    x = torch.randn(200, 128)
    with torch.no_grad():
        wrapped.fc(x)  # an eval forward before the update
        if update == "data":
            for p in wrapped.parameters():
                p.data.add_(0.1)  # a hand-written SGD step
        elif update == "vector_to_parameters":
            vector = torch.nn.utils.parameters_to_vector(wrapped.parameters())
            torch.nn.utils.vector_to_parameters(vector * 1.5, wrapped.parameters())
        elif update == "ema":
            for p in wrapped.parameters():
                p.data.copy_(0.5 * p.data + 0.5 * torch.randn_like(p))
        else:
            fc.weight = nn.Parameter(torch.randn(10, 128))
        out = fc(x)
    torch.testing.assert_close(out, reference(fc, layer, x).float(), atol=1e-5, rtol=1e-5)


def test_a_change_inside_the_scope_folds_again_at_the_next_call():
    _, wrapped = calibrated_net()
    fc, layer = wrapped.fc, ps.pca_layers_of(wrapped)["fc"]
    x = torch.randn(5, 128)
    with torch.no_grad(), ps.folded(wrapped):
        first = cached_fold(fc)
        fc(x)
        assert cached_fold(fc) is first
        layer.threshold = 0.5
        out = fc(x)
        assert cached_fold(fc) is not first
    torch.testing.assert_close(out, reference(fc, layer, x).float(), atol=1e-5, rtol=1e-5)


def test_a_module_with_a_forward_of_its_own_is_projected_after_that_forward():
    """An instance-level forward (a user's patch) is what the PCA layer follows, folded or not."""
    torch.manual_seed(0)
    lin = nn.Linear(6, 5)
    lin.forward = types.MethodType(lambda s, x: F.linear(x, s.weight, s.bias) * 2, lin)
    model = nn.Sequential(lin).eval()
    wrapped = ps.calibrate(ps.pca_wrap(model, 0.8), [torch.randn(64, 6)], progress=False)
    assert sites_of(wrapped)[0].attachment == "wrapper"
    layer, x = ps.pca_layers_of(wrapped)["0"], torch.randn(7, 6)
    expected = layer(lin(x)).detach()
    direct = (lin(x).double() - layer.center()) @ layer.basis @ layer.basis.T + layer.center()
    torch.testing.assert_close(expected, direct.float(), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x), expected, atol=1e-5, rtol=1e-5)
        with ps.folded(wrapped):
            torch.testing.assert_close(wrapped(x), expected, atol=1e-5, rtol=1e-5)
    plan = ps.compression_plan(wrapped)
    small = ps.compress(wrapped)
    torch.testing.assert_close(small(x), expected, atol=1e-5, rtol=1e-5)
    assert (
        ps.count_params(small) - ps.count_params(model)
        == (plan["params_after"] - plan["params_before"]).sum()
    )


def test_training_gradients_and_hooks_run_the_separate_map():
    _, wrapped = calibrated_net()
    fc, layer = wrapped.fc, ps.pca_layers_of(wrapped)["fc"]
    x = torch.randn(4, 128)
    scope = ps.folded(wrapped)
    scope.__enter__()
    folding._FOLDS.pop(fc)  # the scope's fold: none of these calls may build one
    out = fc(x)  # eval, but gradients are wanted: not folded
    assert cached_fold(fc) is None
    out.sum().backward()
    assert fc.weight.grad is not None and fc.weight.grad.abs().sum() > 0
    seen = []
    handle = layer.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with torch.no_grad():
        fc(x)
    handle.remove()
    assert seen == [(4, 10)] and cached_fold(fc) is None
    wrapped.train()
    with torch.no_grad():
        fc(x)  # training mode collects
    assert int(layer.sample_count) == 4 and cached_fold(fc) is None  # a fresh phase
    scope.__exit__(None, None, None)


def test_the_cache_is_never_copied_or_pickled_and_the_state_dict_is_unchanged():
    _, wrapped = calibrated_net()
    with torch.no_grad(), ps.folded(wrapped):
        wrapped(torch.randn(2, 3, 4, 4))
        assert cached_fold(wrapped.fc) is not None
        keys = set(wrapped.state_dict())
        clones = (copy.deepcopy(wrapped), pickle.loads(pickle.dumps(wrapped)))
    assert not any("fold" in k for k in keys)
    for clone in clones:
        assert cached_fold(clone.fc) is None and type(clone.fc) is type(wrapped.fc)
        assert set(clone.state_dict()) == keys
        x = torch.randn(3, 3, 4, 4)
        with torch.no_grad():
            torch.testing.assert_close(clone(x), wrapped(x))


def test_a_saved_whole_model_loads_in_a_fresh_process(tmp_path):
    import subprocess
    import sys

    _, wrapped = calibrated_net()
    x = torch.randn(3, 3, 4, 4)
    torch.save({"model": wrapped, "x": x, "y": wrapped(x).detach()}, tmp_path / "m.pt")
    code = (
        "import sys, torch; sys.path.insert(0, 'tests');"
        "import test_folding;"  # the class Net lives there, as a user's model class would
        f"d = torch.load({str(tmp_path / 'm.pt')!r}, weights_only=False);"
        "m = d['model'];"
        "assert type(m.fc).__name__ == 'ProjectedLinear', type(m.fc);"
        "torch.testing.assert_close(m(d['x']), d['y']); print('ok')"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "ok", result.stderr


@pytest.mark.parametrize(
    "n, d, threshold, with_rest, route",
    [
        (12, 10, 0.99, True, "rest"),
        (12, 10, 0.9, False, "basis"),
        (60, 4, 0.8, False, "projection"),
    ],
)
def test_a_float64_fold_reads_a_float32_weight_a_block_of_rows_at_a_time(
    monkeypatch, n, d, threshold, with_rest, route
):
    """``compress`` folds in float64 without a float64 copy of the whole weight or of the
    result: each route equals the fold of the float64 weight, rounded once."""
    from pcasurgery.core import spectrum
    from pcasurgery.layers import folding

    torch.manual_seed(0)
    wrapped = ps.pca_wrap(nn.Sequential(nn.Linear(n, d)), threshold)
    ps.calibrate(
        wrapped, (torch.randn(200, n) * torch.linspace(0.1, 2, n)).split(50), progress=False
    )
    layer, module = ps.pca_layers_of(wrapped)["0"], wrapped[0]
    rest = layer.discarded_directions(module) if with_rest else None
    assert folding._route(tuple(layer.basis.shape), n, rest) == route
    w, b = module.weight.detach(), module.bias.detach()
    want_w, want_b = folding.folded_affine(w.double(), b.double(), layer, rest)
    monkeypatch.setattr(spectrum, "_ROWS_BYTES", 8 * max(n, d) * 3)  # 3 rows a block
    blocks, real = [], spectrum.row_blocks

    def counting(a, width=0):
        for rows, block in real(a, width):
            blocks.append(block.shape[0])
            yield rows, block

    monkeypatch.setattr(spectrum, "row_blocks", counting)
    got_w, got_b = folding.folded_affine(w, b, layer, rest, torch.float64)
    assert got_w.dtype == got_b.dtype == torch.float32
    assert len(blocks) > 1 and max(blocks) <= 3
    # rounded once from float64: the same floats (the blocks sum in another order, 1e-16)
    torch.testing.assert_close(got_w, want_w.float(), rtol=0, atol=0)
    torch.testing.assert_close(got_b, want_b.float(), rtol=0, atol=0)
    assert not torch.equal(got_w, w)
