"""Every layer kind (``layers.kinds.KINDS``) through the whole workflow.

1-d convolutions (audio), transposed convolutions (a UNet's decoder), 3-d ones:
wrap with every conv weight covered, calibrate, report, project (folded and
not) against a float64 reference computed from the original module, compress
into exactly what the plan promised, export to ONNX, track during training.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import pcasurgery as ps
from pcasurgery.layers.kinds import KINDS, kind_of

ALL_KINDS = tuple(cls for kind in KINDS for cls in kind.classes)


class AudioNet(nn.Module):
    """A 1-d encoder-decoder over a waveform: strided Conv1d, BatchNorm1d, depthwise, transposed."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv1d(2, 16, 9, stride=2, padding=4)
        self.bn1 = nn.BatchNorm1d(16)
        self.conv2 = nn.Conv1d(16, 24, 5, padding=2)
        self.depthwise = nn.Conv1d(24, 24, 3, padding=1, groups=24)
        self.up = nn.ConvTranspose1d(24, 12, 4, stride=2, padding=1)
        self.head = nn.Linear(12, 4)

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.relu(self.depthwise(torch.relu(self.conv2(h))))
        return self.head(torch.relu(self.up(h)).mean(-1))


class UNet(nn.Module):
    """Two levels: down, a bottleneck, a ConvTranspose2d up-sampling, a skip connection."""

    def __init__(self):
        super().__init__()
        self.down = nn.Conv2d(3, 16, 3, padding=1)
        self.mid = nn.Conv2d(16, 32, 3, padding=1)
        self.up = nn.ConvTranspose2d(32, 16, 2, stride=2)
        self.bn = nn.BatchNorm2d(16)
        self.up_odd = nn.ConvTranspose2d(16, 8, 3, stride=2, padding=1, output_padding=1)
        self.out = nn.Conv2d(16 + 16, 2, 1)  # the up-sampled map and the skip

    def forward(self, x):
        skip = torch.relu(self.down(x))
        h = torch.relu(self.mid(nn.functional.max_pool2d(skip, 2)))
        h = torch.relu(self.bn(self.up(h)))
        extra = self.up_odd(h)  # 2x larger again, pooled back to the skip's size
        h = h + nn.functional.avg_pool2d(extra, 2).mean(1, keepdim=True)
        return self.out(torch.cat([h, skip], 1))


class Volume(nn.Module):
    """3-d convolutions and a ConvTranspose3d."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(2, 8, 3, padding=1)
        self.up = nn.ConvTranspose3d(8, 6, 2, stride=2)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.relu(self.up(torch.relu(self.conv(x)))).mean((2, 3, 4)))


def _warmed(model: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    torch.manual_seed(0)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(*shape))
    return model.eval()


CASES = {
    "audio": (AudioNet, (8, 2, 64)),
    "unet": (UNet, (4, 3, 8, 8)),
    "volume": (Volume, (4, 2, 4, 4, 4)),
}


def calibrated(case: str, threshold: float = 0.9) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    cls, shape = CASES[case]
    model = _warmed(cls(), shape)
    torch.manual_seed(1)
    data = [torch.randn(*shape) for _ in range(4)]
    wrapped = ps.pca_wrap(model, threshold, targets=ALL_KINDS)
    ps.calibrate(wrapped, data, progress=False)
    return model, wrapped, data[0]


def projected_reference(original: nn.Module, layer: ps.PCALayer, x: torch.Tensor) -> torch.Tensor:
    """``layer(module(x))`` in float64: the original module's output, projected channelwise."""
    y = copy.deepcopy(original).double()(x.double())
    v, c = layer.basis.double(), layer.center().double()
    dim = 1 if layer.spatial_dims else -1
    z = y.movedim(dim, -1)
    return ((z - c) @ v @ v.T + c).movedim(-1, dim)


def _inputs_of(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    seen: dict[str, torch.Tensor] = {}

    def keep(name: str, args: tuple) -> None:
        seen.setdefault(name, args[0])

    handles = [
        m.register_forward_hook(lambda m, args, out, name=name: keep(name, args))
        for name, m in model.named_modules()
        if kind_of(m) is not None
    ]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return seen


@pytest.mark.parametrize("case", list(CASES))
def test_every_conv_weight_is_covered_and_projects_as_the_float64_reference(case):
    model, wrapped, x = calibrated(case)
    layers = ps.pca_layers_of(wrapped)
    convs = {n for n, m in model.named_modules() if kind_of(m) is not None}
    assert set(layers) == convs  # every weight covered
    table = ps.report(wrapped).set_index("layer")
    for name, layer in layers.items():
        module = model.get_submodule(name)
        assert table.loc[name, "kind"] == layer.kind
        assert layer.spatial_dims == kind_of(module).spatial_dims  # type: ignore[union-attr]
    inputs = _inputs_of(model, x)
    for name, layer in layers.items():
        module = wrapped.get_submodule(name)
        expected = projected_reference(model.get_submodule(name), layer, inputs[name]).float()
        with torch.no_grad():
            torch.testing.assert_close(module(inputs[name]), expected, atol=1e-4, rtol=1e-4)
            with ps.folded(wrapped):
                folded = module(inputs[name])
                foldable = kind_of(module).name != "conv1d" or module.groups == 1  # type: ignore[union-attr]
                assert (ps.layers.folding.cached_fold(module) is not None) == foldable
            torch.testing.assert_close(folded, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("remove", [0.2, 0.4])
def test_the_plan_is_delivered_and_the_compressed_model_exports(case, remove, tmp_path):
    model, wrapped, x = calibrated(case, 0.99)
    plan = ps.budget_plan(wrapped, remove=remove)
    ps.apply_plan(wrapped, plan)
    table = ps.compression_plan(wrapped).set_index("layer")
    rows = plan.set_index("layer")
    assert (table.loc[rows.index, "action"] == rows["action"]).all()
    assert (table.loc[rows.index, "params_after"] == rows["params_after"]).all()
    small = ps.compress(wrapped)
    assert not any(isinstance(m, ps.PCALayer) for m in small.modules())
    promised = int((plan["params_before"] - plan["params_after"]).sum())
    assert ps.count_params(model) - ps.count_params(small) == promised
    assert promised >= remove * plan["params_before"].sum()
    macs = int((plan["macs_before"] - plan["macs_after"]).sum())
    assert ps.count_macs(model, x) - ps.count_macs(small, x) == macs
    with torch.no_grad():
        torch.testing.assert_close(small(x), wrapped(x), atol=1e-4, rtol=1e-4)
    ps.export_onnx(small, x[:2], tmp_path / "small.onnx")  # checked in onnxruntime


def test_transposed_convolutions_factorise_and_fold_in_their_own_layout():
    torch.manual_seed(0)
    model = nn.Sequential(nn.ConvTranspose2d(6, 40, 3, stride=2, padding=1, output_padding=1))
    mix = torch.randn(6, 6)
    data = [torch.einsum("nchw,cd->ndhw", torch.randn(16, 6, 5, 5), mix) for _ in range(2)]
    wrapped = ps.calibrate(ps.pca_wrap(model.eval(), 0.7, targets=nn.ConvTranspose2d), data,
                           progress=False)  # fmt: skip
    layer = ps.pca_layers_of(wrapped)["0"]
    assert layer.in_dim < 20  # rank 6 at most: the pair pays
    small = ps.compress(wrapped)
    low_rank = small[0]
    assert isinstance(low_rank[0], nn.ConvTranspose2d) and isinstance(low_rank[1], nn.Conv2d)
    assert low_rank[0].out_channels == layer.in_dim == low_rank.rank
    assert low_rank.weight.shape == model[0].weight.shape  # the dense map, as the layer holds it
    expected = projected_reference(model[0], layer, data[0]).float()
    with torch.no_grad():
        torch.testing.assert_close(small(data[0]), expected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(
            nn.functional.conv_transpose2d(data[0], low_rank.weight, low_rank.bias, 2, 1, 1),
            expected, atol=1e-4, rtol=1e-4,
        )  # fmt: skip


def test_a_conv1d_model_is_tracked_during_training(tmp_path):
    model = AudioNet()
    tracker = ps.CheckLayerSat(str(tmp_path / "run"), save_to="npy", modules=model,
                               stats=["lsat", "idim"], verbose=False, device="cpu")  # fmt: skip
    model.train()
    batches = [torch.randn(8, 2, 64) for _ in range(3)]
    for x in batches:
        model(x)
    covariances = tracker.logs["train-covariance-matrix"]
    assert list(covariances) == ["conv1", "conv2", "depthwise", "up", "head"]
    # every position of a 1-d map is a sample of its channels: the covariance of conv2's
    # outputs (24 channels) against numpy's
    seen = []
    handle = model.conv2.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    with torch.no_grad():
        for x in batches:
            model(x)
    handle.remove()
    samples = torch.cat([o.movedim(1, -1).reshape(-1, 24) for o in seen]).double().numpy()
    ours = covariances["conv2"].fix().double().numpy()
    np.testing.assert_allclose(ours, np.cov(samples, rowvar=False, bias=True), atol=1e-6)
    tracker.add_saturations()
    tracker.close()
    assert (tmp_path / "run" / "_train-saturation_conv2").exists()
