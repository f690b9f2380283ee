"""Compression under a budget: the plan against a brute-force optimum, then applied."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from models import warmed_resnet
from torch import nn

import pcasurgery as ps
from pcasurgery.core.spectrum import explained_fraction


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
    from pcasurgery.compression.compress import _plan_layer

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
        costs.append([_plan_layer(layer, module, k).params for k in ks])
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
