"""Compression under a budget: the plan against a brute-force optimum, then applied."""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pandas as pd
import pytest
import torch
from models import Conv1D, warmed_resnet
from torch import nn

import pcasurgery as ps
from pcasurgery.core.spectrum import explained_fraction
from pcasurgery.layers import sites_of
from pcasurgery.layers.kinds import kind_of


def spectra_model(seed: int = 0) -> tuple[nn.Module, list[torch.Tensor]]:
    """Three Linear layers whose outputs have clearly different spectra."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(10, 12), nn.Tanh(), nn.Linear(12, 9), nn.Tanh(), nn.Linear(9, 8)
    )
    scales = torch.tensor([4.0, 2.0, 1.0, 0.5, 0.3, 0.2, 0.1, 0.05, 0.02, 0.01])
    data = [torch.randn(256, 10, generator=torch.Generator().manual_seed(i)) * scales
            for i in range(2)]  # fmt: skip
    return model.eval(), data


def brute_force(plan_layers, costs, losses, target):
    best = None
    for choice in itertools.product(*[range(len(c)) for c in costs]):
        cost = sum(c[i] for c, i in zip(costs, choice, strict=True))
        if cost <= target:
            loss = sum(val[i] for val, i in zip(losses, choice, strict=True))
            if best is None or loss < best:
                best = loss
    return best


@pytest.mark.parametrize("remove", [0.2, 0.35, 0.5])
def test_the_plan_meets_the_budget_near_the_optimal_loss(remove):
    from pcasurgery.compression.plan import plan_layer

    model, data = spectra_model()
    wrapped = ps.calibrate(ps.pca_wrap(model), data, progress=False)
    before = {n: layer.threshold for n, layer in ps.pca_layers_of(wrapped).items()}
    plan = ps.budget_plan(wrapped, remove=remove)
    assert {n: layer.threshold for n, layer in ps.pca_layers_of(wrapped).items()} == before
    assert plan.attrs["removed"] >= remove
    assert plan["params_after"].sum() <= (1 - remove) * plan["params_before"].sum()
    # independent brute force over every combination of ranks
    costs, losses, shares = [], [], []
    for name, layer in ps.pca_layers_of(wrapped).items():
        module = wrapped.get_submodule(name)
        ks = range(1, layer.width + 1)
        costs.append([plan_layer(layer, module, k).params for k in ks])
        values = layer.eigenvalues.numpy()
        # the allocation minimises the sum of squared fractions of the output's energy
        # lost: the dropped variance over trace(cov) + |mean|^2 (centred statistics)
        energy = values.sum() + (layer.mean.numpy() ** 2).sum()
        losses.append([(values[k:].sum() / energy) ** 2 for k in ks])
        shares.append(values.sum() / energy)
    optimum = brute_force(plan, costs, losses, (1 - remove) * plan["params_before"].sum())
    ours = float((((1 - plan["explained"]) * np.array(shares)) ** 2).sum())
    assert ours <= optimum * 1.01 + 1e-9, (ours, optimum)
    # and better than the best single threshold that meets the same budget
    for t in np.linspace(0.5, 0.9999, 200):
        ks = [ps.core.intrinsic_dimensionality(layer.eigenvalues, float(t))
              for layer in ps.pca_layers_of(wrapped).values()]  # fmt: skip
        cost = sum(c[max(k, 1) - 1] for c, k in zip(costs, ks, strict=True))
        if cost <= (1 - remove) * plan["params_before"].sum():
            loss = sum(val[max(k, 1) - 1] for val, k in zip(losses, ks, strict=True))
            assert ours <= loss + 1e-12


def test_applying_the_plan_compresses_to_the_planned_size():
    model, data = spectra_model(1)
    wrapped = ps.calibrate(ps.pca_wrap(model), data, progress=False)
    plan = ps.budget_plan(wrapped, remove=0.3)
    ps.apply_plan(wrapped, plan)
    layers = ps.pca_layers_of(wrapped)
    assert [layers[n].in_dim for n in plan["layer"]] == plan["k"].tolist()
    for name, explained in zip(plan["layer"], plan["explained"], strict=True):
        assert layers[name].explained == pytest.approx(explained)
    small = ps.compress(wrapped)
    assert ps.count_params(small) == ps.count_params(model) - plan["params_before"].sum() + (
        plan["params_after"].sum()
    )
    assert ps.count_params(small) <= 0.7 * ps.count_params(model) + 1
    x = torch.randn(5, 10)
    with torch.no_grad():
        torch.testing.assert_close(small(x), wrapped(x), atol=1e-5, rtol=1e-4)


def test_a_plan_applies_where_the_variance_fractions_round_to_one_before_the_width():
    # 16 features of rank 4 have 4 real directions, and rounding noise in a few
    # more: the fraction the top 13 directions carry is 1.0, which as a threshold
    # would keep all 16
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Linear(16, 16)).eval()
    wrapped = ps.calibrate(ps.pca_wrap(model, include=["1"]), [torch.randn(512, 4)],
                           progress=False)  # fmt: skip
    layer = ps.pca_layers_of(wrapped)["1"]
    assert explained_fraction(layer.eigenvalues, 13) == 1.0
    plan = ps.budget_plan(wrapped, remove=0.5)
    plan.loc[0, "k"] = 13
    ps.apply_plan(wrapped, plan)
    assert 4 < layer.in_dim <= 13


def test_budget_by_macs_on_a_conv_net_and_an_include_filter():
    wrapped = ps.calibrate(ps.pca_wrap(warmed_resnet(), 0.99), torch.randn(64, 3, 8, 8).split(32),
                           progress=False)  # fmt: skip
    plan = ps.budget_plan(wrapped, remove=0.25, by="macs")
    assert plan.attrs["by"] == "macs" and plan.attrs["removed"] >= 0.25
    assert plan["macs_after"].sum() <= 0.75 * plan["macs_before"].sum()
    only = ps.budget_plan(wrapped, remove=0.2, include="layer1.*")
    assert only["layer"].tolist() == [f"layer1.{b}.conv{c}" for b in (0, 1) for c in (1, 2)]


def test_bad_budgets_are_refused_and_leave_the_model_alone():
    model, data = spectra_model()
    wrapped = ps.calibrate(ps.pca_wrap(model), data, progress=False)
    state = {k: v.clone() for k, v in wrapped.state_dict().items()}
    for bad in (0, 1, 1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match=r"remove must be a fraction in \(0, 1\)"):
            ps.budget_plan(wrapped, remove=bad)
    with pytest.raises(ValueError, match="remove=0.99 is out of reach: .* at most"):
        ps.budget_plan(wrapped, remove=0.99)
    with pytest.raises(ValueError, match="include='nope.*' matches no PCA layer"):
        ps.budget_plan(wrapped, remove=0.2, include="nope.*")
    with pytest.raises(ValueError, match="by must be one of 'params', 'macs'"):
        ps.budget_plan(wrapped, remove=0.2, by="flops")
    with pytest.raises(ValueError, match="plan must be a DataFrame from budget_plan"):
        ps.apply_plan(wrapped, {"layer": ["0"]})
    for key, value in wrapped.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert explained_fraction(torch.zeros(3), 1) == 1.0


def test_a_metric_refines_the_plan_and_leaves_the_thresholds_alone():
    model, data = spectra_model(2)
    wrapped = ps.calibrate(ps.pca_wrap(model), data, progress=False)
    x = torch.cat(data)
    with torch.no_grad():
        reference = model(x)
    calls = []

    @torch.no_grad()
    def fidelity(m):  # higher is better; the last layer's small directions matter most here
        calls.append(1)
        out = m(x)
        return -float(
            ((out - reference)[:, -3:] ** 2).mean() * 100 + ((out - reference) ** 2).mean()
        )

    thresholds = {n: layer.threshold for n, layer in ps.pca_layers_of(wrapped).items()}
    spectral = ps.budget_plan(wrapped, remove=0.3)
    plan = ps.budget_plan(wrapped, remove=0.3, evaluate=fidelity)
    assert len(calls) == len(plan) + 3
    assert {n: layer.threshold for n, layer in ps.pca_layers_of(wrapped).items()} == thresholds
    assert plan.attrs["removed"] >= 0.3
    assert plan.attrs["metric"] == max(plan.attrs["metric_spectral"], plan.attrs["metric_refined"])
    ps.apply_plan(wrapped, spectral)
    assert fidelity(wrapped) == pytest.approx(plan.attrs["metric_spectral"])
    ps.apply_plan(wrapped, plan)
    assert fidelity(wrapped) == pytest.approx(plan.attrs["metric"])
    with pytest.raises(ValueError, match="returned metric = nan at full rank"):
        ps.budget_plan(wrapped, remove=0.3, evaluate=lambda m: float("nan"))


def mse_loss(model, batch):
    x, y = batch
    return nn.functional.mse_loss(model(x), y, reduction="sum")


def test_gradient_penalties_match_an_independent_computation():
    model, data = spectra_model(2)
    wrapped = ps.calibrate(ps.pca_wrap(model), data, progress=False)
    targets = [(x, torch.randn(x.shape[0], 8, generator=torch.Generator().manual_seed(9)))
               for x in data]  # fmt: skip
    layers = ps.pca_layers_of(wrapped)
    ours = penalties(wrapped, targets)
    # reference: the plain model's per-sample gradients at each Linear's output, in float64,
    # on the eigenvectors of numpy's covariance of that output
    plain = copy.deepcopy(model).double()
    for name, penalty in zip(layers, ours, strict=True):
        outputs, grads = [], []
        for x, y in targets:
            captured = {}

            def keep(module, args, out, captured=captured):
                out.retain_grad()
                captured["out"] = out

            hook = plain.get_submodule(name).register_forward_hook(keep)
            value = nn.functional.mse_loss(plain(x.double()), y.double(), reduction="sum")
            value.backward()
            hook.remove()
            outputs.append(captured["out"].detach().numpy())
            grads.append(captured["out"].grad.numpy())
        out, grad = np.concatenate(outputs), np.concatenate(grads)
        values, vectors = np.linalg.eigh(np.cov(out, rowvar=False, bias=True))
        values, vectors = values[::-1], vectors[:, ::-1]
        s = ((grad @ vectors) ** 2).sum(0)
        reference = [float((values[k:] * s[k:]).sum()) for k in range(1, len(values) + 1)]
        np.testing.assert_allclose(penalty, reference, rtol=1e-4, atol=1e-6 * max(reference))


def test_the_gradient_plan_spends_the_budget_where_the_loss_does_not_look():
    # two branches of equal spectra; the loss reads the first branch 100x more than the second
    torch.manual_seed(3)

    class Branches(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(12, 32), nn.Linear(12, 32)
            self.b.load_state_dict(self.a.state_dict())
            self.relu = nn.ReLU(inplace=True)  # in-place right after a PCA layer

        def forward(self, x):
            return torch.cat([self.relu(self.a(x)), 0.01 * self.b(x)], 1)

    model = Branches().eval()
    scales = 0.7 ** torch.arange(12.0)
    data = [torch.randn(512, 12) * scales for _ in range(2)]
    wrapped = ps.calibrate(ps.pca_wrap(model), data, progress=False)
    state = {k: v.clone() for k, v in wrapped.state_dict().items()}
    flags = [p.requires_grad for p in wrapped.parameters()]
    # the Gauss-Newton curvature of the outputs: a random projection of them
    directions = [torch.randn(512, 64) for _ in data]
    projected = list(zip(data, directions, strict=True))
    spectral = ps.budget_plan(wrapped, remove=0.25)
    gradient = ps.budget_plan(wrapped, remove=0.25, loss=lambda m, b: (m(b[0]) * b[1]).sum(),
                              data=projected)  # fmt: skip
    assert gradient.attrs["objective"] == "gradient" and spectral.attrs["objective"] == "spectral"
    ks = dict(zip(gradient["layer"], gradient["k"], strict=True))
    assert ks["a"] > ks["b"], ks
    # the model is as it was: statistics, modes, gradient flags, no hook left (the
    # eigenvectors, pending since calibration, were computed at their first use)
    lazy = ("eigenvectors", "basis", "projection_weight", "projection_bias", "vectors_pending")
    assert all(
        torch.equal(v, state[k]) for k, v in wrapped.state_dict().items() if not k.endswith(lazy)
    )
    assert [p.requires_grad for p in wrapped.parameters()] == flags
    assert not wrapped.training and all(
        layer.mode == "auto" for layer in ps.pca_layers_of(wrapped).values()
    )
    assert not any(layer._forward_hooks for layer in ps.pca_layers_of(wrapped).values())

    def compressed_loss(plan):
        ps.apply_plan(wrapped, plan)
        small = ps.compress(wrapped)
        with torch.no_grad():
            return sum(float(mse_loss(small, (x, model(x)))) for x in data)

    assert compressed_loss(gradient) < 0.5 * compressed_loss(spectral)


def test_bad_losses_are_refused_and_leave_the_model_alone():
    model, data = spectra_model()
    wrapped = ps.calibrate(ps.pca_wrap(model), data, progress=False)
    target = [(x, torch.zeros(x.shape[0], 8)) for x in data]
    state = {k: v.clone() for k, v in wrapped.state_dict().items()}
    with pytest.raises(ValueError, match="loss and data go together"):
        ps.budget_plan(wrapped, remove=0.2, loss=mse_loss)
    with pytest.raises(ValueError, match="loss and data go together"):
        ps.budget_plan(wrapped, remove=0.2, data=target)
    with pytest.raises(TypeError, match="loss must be callable"):
        ps.budget_plan(wrapped, remove=0.2, loss="mse", data=target)
    with pytest.raises(ValueError, match="at least one batch"):
        ps.budget_plan(wrapped, remove=0.2, loss=mse_loss, data=[])
    with pytest.raises(ValueError, match="returned nan for batch 0"):
        ps.budget_plan(wrapped, remove=0.2, loss=lambda m, b: mse_loss(m, b) * float("nan"),
                       data=target)  # fmt: skip
    with pytest.raises(TypeError, match="scalar tensor"):
        ps.budget_plan(wrapped, remove=0.2, loss=lambda m, b: m(b[0]), data=target)
    with pytest.raises(ValueError, match="gradient is zero"):
        # a loss at its minimum (the distance to the model's own outputs) has no gradient
        ps.budget_plan(wrapped, remove=0.2, loss=mse_loss,
                       data=[(x, model(x).detach()) for x in data])  # fmt: skip
    with pytest.raises(ValueError, match="does not depend"):
        ps.budget_plan(wrapped, remove=0.2, loss=lambda m, b: torch.tensor(1.0), data=target)

    def broken(m, b):
        m(b[0])
        raise KeyError("the user's own error")

    with pytest.raises(KeyError, match="own error"):
        ps.budget_plan(wrapped, remove=0.2, loss=broken, data=target)
    assert all(torch.equal(v, state[k]) for k, v in wrapped.state_dict().items())
    assert all(p.requires_grad for p in wrapped.parameters())
    assert not any(layer._forward_hooks for layer in ps.pca_layers_of(wrapped).values())


def _plan_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model, data = spectra_model(4)
        shard = [(x[rank::world], y[rank::world]) for x, y in sharded_targets(data)]
        wrapped = ps.calibrate(ps.pca_wrap(model), [x for x, _ in shard], progress=False)
        plan = ps.budget_plan(wrapped, remove=0.3, loss=mse_loss, data=shard)
        plan.to_csv(f"{out_dir}/plan{rank}.csv", index=False)
        np.save(f"{out_dir}/penalties{rank}.npy", np.concatenate(penalties(wrapped, shard)))
    finally:
        dist.destroy_process_group()


def penalties(wrapped, data):
    from pcasurgery.analysis.budget import _candidates, _gradient_penalties

    layers = ps.pca_layers_of(wrapped)
    items = [_candidates(wrapped, site, layers[site.name]) for site in sites_of(wrapped)]
    return _gradient_penalties(wrapped, dict(layers), items, mse_loss, data)


def sharded_targets(data):
    return [(x, torch.randn(x.shape[0], 8, generator=torch.Generator().manual_seed(i)))
            for i, x in enumerate(data)]  # fmt: skip


def test_two_processes_weigh_their_shards_into_the_plan_of_the_union(tmp_path):
    import pandas as pd
    import torch.multiprocessing as mp

    world = 2
    mp.spawn(_plan_worker, args=(world, str(tmp_path / "store"), str(tmp_path)), nprocs=world,
             join=True)  # fmt: skip
    model, data = spectra_model(4)
    union = sharded_targets(data)
    # one process, the same samples in the same batches (each batch's shards side by side)
    joined = [(torch.cat([x[r::world] for r in range(world)]),
               torch.cat([y[r::world] for r in range(world)])) for x, y in union]  # fmt: skip
    wrapped = ps.calibrate(ps.pca_wrap(model), [x for x, _ in joined], progress=False)
    single = ps.budget_plan(wrapped, remove=0.3, loss=mse_loss, data=joined)
    reference = np.concatenate(penalties(wrapped, joined))
    for r in range(world):
        plan = pd.read_csv(tmp_path / f"plan{r}.csv")
        assert plan["k"].tolist() == single["k"].tolist()
        np.testing.assert_allclose(np.load(tmp_path / f"penalties{r}.npy"), reference, rtol=1e-3)


class MobileNetStyle(nn.Module):
    """Inverted residuals: expand 1x1, depthwise 3x3 (groups = channels), project 1x1, BatchNorms."""

    def __init__(self, squeeze_excite: bool = False):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.expand = nn.Sequential(nn.Conv2d(16, 48, 1), nn.BatchNorm2d(48), nn.ReLU6())
        self.depthwise = nn.Sequential(
            nn.Conv2d(48, 48, 3, padding=1, groups=48), nn.BatchNorm2d(48), nn.ReLU6()
        )
        self.grouped = nn.Conv2d(48, 48, 1, groups=4)
        self.se = (
            nn.Sequential(
                nn.AdaptiveAvgPool2d(1),
                nn.Conv2d(48, 12, 1),
                nn.SiLU(),
                nn.Conv2d(12, 48, 1),
                nn.Sigmoid(),
            )  # fmt: skip
            if squeeze_excite
            else None
        )
        self.project = nn.Sequential(nn.Conv2d(48, 16, 1), nn.BatchNorm2d(16))
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        h = self.stem(x)
        y = self.grouped(self.depthwise(self.expand(h)))
        if self.se is not None:
            y = y * self.se(y)
        return self.head((h + self.project(y)).mean((2, 3)))


def _warmed(model: nn.Module) -> nn.Module:
    """BatchNorms with running statistics of their own (not the identity)."""
    torch.manual_seed(3)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 3, 8, 8))
    return model.eval()


@pytest.mark.parametrize("squeeze_excite", [False, True])
@pytest.mark.parametrize("remove", [0.2, 0.4])
def test_the_plan_is_what_compress_delivers_on_depthwise_and_grouped_networks(
    squeeze_excite, remove
):
    model = _warmed(MobileNetStyle(squeeze_excite))
    data = [torch.randn(32, 3, 8, 8) for _ in range(3)]
    wrapped = ps.calibrate(ps.pca_wrap(model, 0.99), data, progress=False)
    sites = {site.name: site for site in sites_of(wrapped)}
    assert "depthwise.0" in sites and "grouped" in sites  # wrapped: their saturation is reported
    for by in ("params", "macs"):
        plan = ps.budget_plan(wrapped, remove=remove, by=by)
        rows = plan.set_index("layer")
        assert rows.loc["depthwise.0", "action"] == "identity"
        assert rows.loc["grouped", "action"] == "identity"
        ps.apply_plan(wrapped, plan)
        table = ps.compression_plan(wrapped).set_index("layer")
        assert (table.loc[plan["layer"], "action"] == rows["action"]).all()
        assert (table.loc[plan["layer"], "k"] == rows["k"]).all()
        assert (table.loc[plan["layer"], "params_after"] == rows["params_after"]).all()
        small = ps.compress(wrapped)
        promised = int((plan["params_before"] - plan["params_after"]).sum())
        assert ps.count_params(model) - ps.count_params(small) == promised
        x = data[0][:4]
        promised_macs = int((plan["macs_before"] - plan["macs_after"]).sum())
        assert ps.count_macs(model, x) - ps.count_macs(small, x) == promised_macs
        removed = plan[f"{by}_before"].sum() - plan[f"{by}_after"].sum()
        assert removed >= remove * plan[f"{by}_before"].sum()
        assert ps.count_params(small) < ps.count_params(model)
        with torch.no_grad():
            torch.testing.assert_close(small(x), wrapped(x), atol=1e-4, rtol=1e-4)
    # a standalone projection the user asks for is built, and the plan of compress counts it
    ps.set_threshold(wrapped, {"depthwise.0": 0.5})
    row = ps.compression_plan(wrapped).set_index("layer").loc["depthwise.0"]
    assert row["action"].startswith("standalone") and row["params_before"] == 0
    bigger = ps.compress(wrapped)
    assert ps.count_params(bigger) - ps.count_params(small) == row["params_after"]


def test_a_layer_that_never_varies_is_planned_and_built_as_its_mean():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 20)).eval()
    with torch.no_grad():  # a zero-initialised head: its output is its bias, always
        model[2].weight.zero_()
        model[2].bias.uniform_()
    wrapped = ps.calibrate(ps.pca_wrap(model), [torch.randn(128, 12)], progress=False)
    plan = ps.budget_plan(wrapped, remove=0.2).set_index("layer")
    assert plan.loc["2", "k"] == 0 and plan.loc["2", "action"] == "factorised"
    assert plan.loc["2", "params_after"] == (32 + 1) + 20 * 2  # a rank-1 pair of zero weights
    ps.apply_plan(wrapped, plan.reset_index())
    table = ps.compression_plan(wrapped).set_index("layer")
    assert table.loc["2", "k"] == 0 and table.loc["2", "action"] == "factorised"
    small = ps.compress(wrapped)
    promised = int((plan["params_before"] - plan["params_after"]).sum())
    assert ps.count_params(model) - ps.count_params(small) == promised
    x = torch.randn(6, 12)
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(small(x), wrapped(x), atol=1e-5, rtol=1e-5)


class _Kinds(nn.Module):
    """A strided Conv1d, a ConvTranspose1d that widens, a Linear and transformers' Conv1D."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(3, 10, 5, stride=2, padding=2)
        self.up = nn.ConvTranspose1d(10, 14, 4, stride=2, padding=1)
        self.linear = nn.Linear(14, 9)
        self.gpt2 = Conv1D(12, 9)

    def forward(self, x):
        h = torch.relu(self.up(torch.relu(self.conv(x))))
        return self.gpt2(torch.tanh(self.linear(h.mT)))


def _kinds_case():
    torch.manual_seed(0)
    return _Kinds().eval(), [torch.randn(8, 3, 16) for _ in range(2)], {}


def _spectra_case():
    return (*spectra_model(2), {})


def _mobile_case():
    return _warmed(MobileNetStyle(True)), [torch.randn(16, 3, 8, 8) for _ in range(2)], {}


def _resnet_case():
    return warmed_resnet(), torch.randn(32, 3, 8, 8).split(16), {}


def _narrowing_case():
    # layers that output their k coordinates (keepdim=False): a Linear's down-projection,
    # and a standalone one after a grouped convolution
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 12), nn.ReLU(), nn.Linear(12, 8)).eval()
    grouped = nn.Sequential(nn.Conv2d(3, 12, 3), nn.ReLU(), nn.Conv2d(12, 12, 3, groups=3))
    data = [torch.randn(64, 10) for _ in range(2)], [torch.randn(16, 3, 8, 8) for _ in range(2)]
    return (model, grouped.eval()), data, {"include": ["2"], "keepdim": False}


@pytest.mark.parametrize(
    "case", [_kinds_case, _spectra_case, _mobile_case, _resnet_case, _narrowing_case]
)
def test_every_rank_a_plan_prices_is_what_compress_builds(case):
    # the plan prices all of a layer's ranks at once; each price must be what compress
    # then builds, counted on the compressed model itself (the ranks a plan does not pick
    # included: standalone projections below full rank, ranks where factorising stops)
    models, datas, options = case()
    if isinstance(models, nn.Module):
        models, datas = (models,), (datas,)
    actions = set()
    for model, data in zip(models, datas, strict=True):
        actions |= _check_every_rank(model, data, options)
    assert len(actions) >= 2, actions  # factorised and folded, or standalone ones


def _check_every_rank(model, data, options) -> set[str]:
    from pcasurgery.compression.plan import followed_module, plan_layers

    wrapped = ps.calibrate(ps.pca_wrap(model, 0.99, **options), data, progress=False)
    layers = ps.pca_layers_of(wrapped)
    sites = {site.name: site for site in sites_of(wrapped)}
    follows = {name: followed_module(wrapped, site) for name, site in sites.items()}
    prices = {
        name: plan_layers(layer, follows[name], np.arange(1, layer.width + 1))
        for name, layer in layers.items()
    }
    # what the replaced modules (fused BatchNorms included) cost before
    params_before = ps.compression_plan(wrapped)["params_before"].sum()
    macs_before = sum(
        layers[n].positions * kind_of(m).macs_per_position(m)
        for n, m in follows.items()
        if m is not None
    )
    x = data[0][:4]
    params, macs = ps.count_params(model), ps.count_macs(model, x)
    actions = set()
    for step in range(1, max(layer.width for layer in layers.values()) + 1):
        ks = {name: min(step, layer.width) for name, layer in layers.items()}
        ps.apply_plan(wrapped, pd.DataFrame({"layer": list(ks), "k": list(ks.values())}))
        small = ps.compress(wrapped)
        after = sum(int(prices[n].params[k - 1]) for n, k in ks.items())
        assert ps.count_params(small) == params - params_before + after, step
        after_macs = sum(
            layers[n].positions * int(prices[n].macs_per_position[k - 1]) for n, k in ks.items()
        )
        assert ps.count_macs(small, x) == macs - macs_before + after_macs, step
        actions |= {str(prices[n].actions[k - 1]) for n, k in ks.items()}
    return actions


@pytest.mark.parametrize("seed", range(6))
def test_the_allocation_is_optimal_where_many_ranks_cost_the_same_units(seed, monkeypatch):
    # the allocation's dynamic programme keeps, of the ranks that round to the same whole
    # units of the budget, the one of least loss: it must still find the optimum of the
    # rounded problem, checked against every combination, and choose as it does with
    # every rank considered
    from pcasurgery.analysis import budget
    from pcasurgery.analysis.budget import _allocate

    rng = np.random.default_rng(seed)
    sizes = (30, 24, 36)
    # each layer's ranks span a few units of the budget: most of its cost is fixed
    costs = [rng.uniform(0, 0.05, n).cumsum() + rng.uniform(50, 150) for n in sizes]
    # real layers lose less with every rank; odd seeds shuffle the losses
    losses = [np.sort(rng.uniform(0, 1, n))[::-1].copy() for n in sizes]
    if seed % 2:
        losses = [rng.permutation(loss) for loss in losses]
    target = sum(float(c[0]) + 0.5 * float(c[-1] - c[0]) for c in costs)
    choice = _allocate(losses, costs, target)
    assert choice is not None
    total = sum(float(c[i]) for c, i in zip(costs, choice, strict=True))
    ours = sum(float(val[i]) for val, i in zip(losses, choice, strict=True))
    assert total <= target
    for cost, loss, i in zip(costs, losses, choice, strict=True):  # no move left that fits
        assert not ((cost - cost[i] <= target - total) & (loss < loss[i])).any()
    unit = target / max(4096, 32 * len(costs))
    units = [np.ceil(c / unit - 1e-9) for c in costs]
    assert sum(len(np.unique(u)) for u in units) < 0.9 * sum(sizes)  # ranks share units
    grid = np.ix_(*[np.arange(n) for n in sizes])
    fits = sum(u[g] for u, g in zip(units, grid, strict=True)) <= max(4096, 32 * len(costs))
    loss = sum(val[g] for val, g in zip(losses, grid, strict=True))
    assert ours <= loss[fits].min() + 1e-12
    monkeypatch.setattr(budget, "_cheapest_per_unit", lambda o, u, loss, b: (o[u <= b], u[u <= b]))
    assert _allocate(losses, costs, target) == choice
