"""compress: compressed == projected, smaller, no PCA layer left; counting."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from models import MLP, Branchy, GroupedConv, SharedLinear, Tokens, warmed_resnet
from test_seed_api import SeedNet
from torch import nn

import pcasurgery as ps
from pcasurgery.compression import macs_per_position


def calibrated(model, data, threshold=0.9, **kwargs):
    wrapped = ps.pca_wrap(model, threshold, **kwargs)
    return ps.calibrate(wrapped, data, progress=False)


def assert_compressed_equals_projected(wrapped, x, atol=1e-5):
    plan = ps.compression_plan(wrapped)
    small = ps.compress(wrapped)
    table = small.compression_report
    pd.testing.assert_frame_equal(plan, table)  # the plan said what compress did
    assert not any(isinstance(m, ps.PCALayer) for m in small.modules())
    wrapped.eval()
    small.eval()
    with torch.no_grad():
        torch.testing.assert_close(small(x), wrapped(x), atol=atol, rtol=1e-4)
    return small, table


def test_residual_cnn_with_batchnorm_fusion():
    net = warmed_resnet()
    wrapped = calibrated(net, torch.randn(96, 3, 8, 8).split(32), 0.9)
    small, table = assert_compressed_equals_projected(wrapped, torch.randn(7, 3, 8, 8))
    assert table["layer"].tolist() == list(ps.pca_layers_of(wrapped))
    assert set(table["action"]) <= {"factorised", "folded"}
    assert table.set_index("layer").loc["layer1.0.conv1", "batchnorm_fused"]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in small.layer1.modules())
    # the input model is untouched and still projecting
    assert len(ps.pca_layers_of(wrapped)) == 7


def test_low_rank_mlp_gets_strictly_fewer_parameters():
    torch.manual_seed(0)
    net = MLP().eval()
    wrapped = calibrated(net, torch.randn(512, 12).split(128), 0.999)
    small, table = assert_compressed_equals_projected(wrapped, torch.randn(33, 12))
    row = table.set_index("layer").loc["fc2"]
    assert row["action"] == "factorised" and row["k"] <= 3
    assert row["params_after"] < row["params_before"]
    assert ps.count_params(small) < ps.count_params(net)


@pytest.mark.parametrize(
    "factory, shape",
    [(Tokens, (6, 9, 5)), (SharedLinear, (20, 6)), (GroupedConv, (5, 4, 6, 6))],
)
def test_compressed_equals_projected_on_other_shapes(factory, shape):
    torch.manual_seed(0)
    net = factory().eval()
    data = [torch.randn(*shape) for _ in range(6)]
    wrapped = calibrated(net, data, 0.8)
    small, table = assert_compressed_equals_projected(wrapped, torch.randn(*shape))
    if factory is GroupedConv:
        assert table.set_index("layer").loc["conv", "action"].startswith("standalone")
    if factory is SharedLinear:
        assert table.set_index("layer").loc["shared", "action"] in {"factorised", "folded"}


def test_hook_wrapped_and_hand_placed_layers_compress_too():
    torch.manual_seed(0)
    hooked = ps.pca_wrap(Branchy().eval(), 0.8)
    ps.calibrate(hooked, torch.randn(200, 4).split(50), progress=False)
    _, table = assert_compressed_equals_projected(hooked, torch.randn(9, 4))
    assert table["layer"].tolist() == ["a", "b"]

    seed = SeedNet()
    with torch.no_grad():
        for _ in range(3):
            seed(torch.randn(32, 3, 4, 4))  # training mode collects
    seed.eval()(torch.randn(2, 3, 4, 4))
    _, table = assert_compressed_equals_projected(seed, torch.randn(5, 3, 4, 4))
    assert set(table["action"]) <= {"standalone", "standalone-factorised", "identity"}


def test_keepdim_false_becomes_the_down_projection_only():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(10, 12), nn.ReLU(), nn.Linear(12, 8)).eval()
    wrapped = calibrated(net, torch.randn(300, 10).split(100), 0.9, include="2", keepdim=False)
    k = ps.pca_layers_of(wrapped)["2"].in_dim
    small, table = assert_compressed_equals_projected(wrapped, torch.randn(4, 10))
    assert table["action"].tolist() == ["down-projection"]
    assert small.get_submodule("2").out_features == k


def test_random_directions_compress_exactly():
    net = warmed_resnet()
    wrapped = calibrated(net, torch.randn(64, 3, 8, 8).split(32), 0.9)
    ps.inject_random_directions(wrapped, seed=1)
    assert_compressed_equals_projected(wrapped, torch.randn(3, 3, 8, 8))


def test_compress_refuses_uncalibrated_models():
    wrapped = ps.pca_wrap(warmed_resnet())
    with pytest.raises(
        ps.NotCalibratedError, match="cannot compress: PCA layers without statistics: stem"
    ):
        ps.compress(wrapped)
    with pytest.raises(ValueError, match="has no PCA layer"):
        ps.compress(nn.Linear(2, 2))


def test_counts_match_hand_arithmetic():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 5 * 5, 6))
    assert ps.count_params(net) == 3 * 4 * 9 + 4 + 100 * 6 + 6
    x = torch.randn(2, 3, 5, 5)
    assert ps.count_macs(net, x) == 3 * 9 * 4 * 25 + 100 * 6
    assert macs_per_position(net[0]) == 3 * 9 * 4
    wrapped = calibrated(net, [torch.randn(8, 3, 5, 5)], 1.0)
    assert ps.count_macs(wrapped, x) == ps.count_macs(net, x) + 4 * 4 * 25 + 6 * 6


class BranchyGrouped(nn.Module):
    """Untraceable (data-dependent branch) with a grouped conv: hooks + standalone projection."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1, groups=2)
        self.head = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        h = self.conv(x)
        if h.mean() > -1e9:
            h = torch.relu(h)
        return self.head(h)


def test_hooked_grouped_conv_becomes_module_plus_standalone_projection():
    torch.manual_seed(0)
    wrapped = ps.pca_wrap(BranchyGrouped().eval(), 0.8)
    ps.calibrate(wrapped, [torch.randn(8, 4, 6, 6) for _ in range(4)], progress=False)
    small, table = assert_compressed_equals_projected(wrapped, torch.randn(3, 4, 6, 6))
    rows = table.set_index("layer")
    assert rows.loc["conv", "action"].startswith("standalone")
    assert rows.loc["head", "action"] in {"factorised", "folded"}
    assert isinstance(small.conv, nn.Sequential) and small.conv[0].groups == 2


def test_low_rank_layers_read_like_the_layer_they_replace():
    from pcasurgery.compression import LowRank

    torch.manual_seed(0)
    net = MLP().eval()
    wrapped = calibrated(net, torch.randn(512, 12).split(128), 0.999)
    small = ps.compress(wrapped)
    fc2 = small.get_submodule("fc2")
    assert isinstance(fc2, LowRank) and fc2.rank <= 3
    assert (fc2.in_features, fc2.out_features) == (32, 32)
    x = torch.randn(5, 32)
    torch.testing.assert_close(
        fc2(x), torch.nn.functional.linear(x, fc2.weight, fc2.bias), atol=1e-5, rtol=1e-5
    )
    wrapped = calibrated(warmed_resnet(), torch.randn(64, 3, 8, 8).split(32), 0.5)
    assert ps.compression_plan(wrapped).set_index("layer").loc["layer1.0.conv1", "action"] == (
        "factorised"
    )
    conv = ps.compress(wrapped).get_submodule("layer1.0.conv1")
    assert isinstance(conv, LowRank)
    assert conv.kernel_size == (3, 3) and conv.out_channels == 8 and conv.in_channels == 8
    assert conv.weight.shape == (8, 8, 3, 3)
    x = torch.randn(2, 8, 8, 8)
    torch.testing.assert_close(
        conv(x), torch.nn.functional.conv2d(x, conv.weight, conv.bias, padding=1),
        atol=1e-5, rtol=1e-5,
    )  # fmt: skip


def test_positions_per_example_survive_a_state_dict_round_trip():
    net = warmed_resnet()
    wrapped = calibrated(net, torch.randn(32, 3, 8, 8).split(16), 0.9)
    assert ps.pca_layers_of(wrapped)["stem"].positions == 64
    assert ps.pca_layers_of(wrapped)["fc"].positions == 1
    fresh = ps.pca_wrap(net)
    fresh.load_state_dict(wrapped.state_dict())
    assert ps.pca_layers_of(fresh)["stem"].positions == 64


class TiedLM(nn.Module):
    """A language model whose output layer shares the token embedding's matrix."""

    def __init__(self, vocab: int = 40, width: int = 16):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.mlp = nn.Linear(width, width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        return self.head(torch.relu(self.mlp(self.embed(tokens))))


def test_tied_weights_stay_tied_and_are_counted_once():
    torch.manual_seed(0)
    model = TiedLM().eval()
    before = ps.count_params(model)
    assert before == 40 * 16 + 16 * 16 + 16  # the shared matrix once
    with pytest.warns(UserWarning, match=r"  - head \(shares a parameter with embed\)"):
        wrapped = ps.pca_wrap(model, 0.5)
    assert list(ps.pca_layers_of(wrapped)) == ["mlp"]
    tokens = torch.randint(0, 40, (64, 12))
    ps.calibrate(wrapped, tokens.split(16), progress=False)
    small = ps.compress(wrapped)
    assert small.head.weight is small.embed.weight  # still tied, not duplicated
    assert ps.count_params(small) < before
    plan = ps.compression_plan(wrapped)
    assert plan["layer"].tolist() == ["mlp"]
    assert (
        ps.count_params(small) == before - plan["params_before"].sum() + plan["params_after"].sum()
    )
    table = ps.sweep(wrapped, [0.5, 1.0])
    assert table["params"].max() <= before
    with torch.no_grad():
        torch.testing.assert_close(small(tokens[:3]), wrapped(tokens[:3]), atol=1e-5, rtol=1e-4)
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="shares its weight"):
        ps.pca_wrap(model, include="head")


def test_gpt2_conv1d_projections_are_wrapped_compressed_and_tracked(tmp_path):
    from models import GPT2Block

    torch.manual_seed(0)
    block = GPT2Block().eval()
    wrapped = ps.pca_wrap(block, 0.9)
    assert list(ps.pca_layers_of(wrapped)) == ["c_attn", "c_proj", "c_fc", "mlp_proj"]
    x = torch.randn(32, 12, 16)
    ps.calibrate(wrapped, x.split(8), progress=False)
    assert ps.count_macs(block, x[:2]) == 12 * (16 * 48 + 16 * 16 + 16 * 64 + 64 * 16)
    small, _ = assert_compressed_equals_projected(wrapped, x[:3], atol=1e-4)
    assert not any(type(m).__name__ == "Conv1D" for m in small.modules())
    assert ps.count_params(small) < ps.count_params(block)
    tracker = ps.CheckLayerSat(str(tmp_path / "gpt2"), "csv", block, device="cpu")
    assert list(tracker.layers) == ["c_attn", "c_proj", "c_fc", "mlp_proj"]
    tracker.close()


def test_a_warning_when_most_weights_sit_in_modules_no_layer_can_follow():
    class Projection(nn.Module):  # a custom layer holding its own matrix
        def __init__(self):
            super().__init__()
            self.matrix = nn.Parameter(torch.randn(64, 64))

        def forward(self, x):
            return x @ self.matrix

    model = nn.Sequential(Projection(), nn.Linear(64, 4))
    with pytest.warns(UserWarning, match=r"94% of the model's layer weights sit in modules that no "
                                         r"PCA layer can follow: Projection \(94%\)"):  # fmt: skip
        ps.pca_wrap(model)


@pytest.mark.parametrize("holder", ["sequential", "data_parallel"])
def test_a_model_holding_a_wrapped_model_is_reported_planned_and_compressed(holder):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 16)).eval()
    wrapped = ps.calibrate(ps.pca_wrap(net, 0.9), [torch.randn(256, 12) @ torch.randn(12, 12)],
                           progress=False)  # fmt: skip
    head = nn.Linear(16, 3)
    model = nn.Sequential(wrapped, head) if holder == "sequential" else nn.DataParallel(wrapped)
    prefix = "0" if holder == "sequential" else "module"
    names = [f"{prefix}.0", f"{prefix}.2"]
    assert list(ps.pca_layers_of(model)) == names
    assert list(ps.report(model)["layer"]) == names
    assert list(ps.compression_plan(model)["layer"]) == names
    plan = ps.budget_plan(model, remove=0.3)
    ps.apply_plan(model, plan)
    small = ps.compress(model)
    assert not any(isinstance(m, ps.PCALayer) for m in small.modules())
    assert type(small) is type(model)
    promised = int((plan["params_before"] - plan["params_after"]).sum())
    assert ps.count_params(model) - ps.count_params(small) == promised
    x = torch.randn(5, 12)
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), atol=1e-5, rtol=1e-5)
    assert ps.layers.sites_of(small) == ()


def test_compress_reads_the_layers_it_replaces_without_copying_their_weights(monkeypatch):
    """The copy ``compress`` works on holds the replaced layers' own weights (read, then
    dropped), so they are not held twice; the result shares no tensor with the wrapped model."""
    import sys

    torch.manual_seed(0)
    wrapped = calibrated(MLP(), torch.randn(96, 12).split(32))
    held = {p.data_ptr() for p in wrapped.parameters()}
    module = sys.modules["pcasurgery.compression.compress"]
    read, pair = [], module._compress_pair

    def reading(layer, followed, plan):
        read.append(followed.weight.data_ptr())
        return pair(layer, followed, plan)

    monkeypatch.setattr(module, "_compress_pair", reading)
    small, _ = assert_compressed_equals_projected(wrapped, torch.randn(5, 12))
    assert len(read) == 3 and set(read) <= held
    assert not {p.data_ptr() for p in small.parameters()} & held
