"""One progress convention: a bar with progress=True whose final count is the work done,
silence with progress=False, and silence by default when standard error is not a terminal."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import pcasurgery as ps
from pcasurgery import _progress


def calibrated_mlp(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4))
    data = [torch.randn(64, 8) @ torch.randn(8, 8) for _ in range(3)]
    return ps.calibrate(ps.pca_wrap(net.eval(), 0.95), data, progress=False, **kwargs)


def last_state(err: str, desc: str) -> str:
    """The last line a bar named ``desc`` wrote (tqdm rewrites its line with carriage returns)."""
    states = [s for s in re.split(r"[\r\n]", err) if s.startswith(f"{desc}:")]
    assert states, f"no {desc!r} bar in {err!r}"
    return states[-1]


def test_calibrate_shows_the_batches_then_the_decompositions_weighted_by_cost(capsys):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 12)).eval()
    wrapped = ps.pca_wrap(net, 0.95)
    ps.calibrate(wrapped, [torch.randn(32, 8) for _ in range(3)], progress=True)
    err = capsys.readouterr().err
    assert "96samples" in last_state(err, "calibrating") and "samples/s" in err
    decompositions = last_state(err, "decompositions")
    assert "100%" in decompositions and "2/2 layers" in decompositions
    ps.calibrate(wrapped, [torch.randn(32, 8) for _ in range(3)], progress=False)
    assert capsys.readouterr().err == ""


def test_the_decomposition_bar_advances_by_each_layers_cost():
    layers = list(ps.pca_layers_of(calibrated_mlp()).values())
    # a widening layer's spectrum comes from its input-wide problem (layers.through)
    widths = [
        layer.width if layer._square_factors is None else layer._square_factors.weight.shape[1]
        for layer in layers
    ]
    assert widths != [layer.width for layer in layers]
    seen = []

    class Recorder:
        done, steps, unit_name = 0, 0, "layer"

        def set_postfix_str(self, *a, **k):
            pass

        def update(self, cost):
            seen.append(cost)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    original = ps.layers.decompose.progress_bar
    ps.layers.decompose.progress_bar = lambda *a, **k: Recorder()
    try:
        ps.layers.decompose.compute_eigenspaces(layers, progress=True)
    finally:
        ps.layers.decompose.progress_bar = original
    assert sorted(seen) == sorted(float(width) ** 3 for width in widths)


def test_by_default_nothing_is_shown_off_a_terminal_or_under_ci(capsys, monkeypatch):
    wrapped = calibrated_mlp()  # progress=None: standard error is captured, not a terminal
    ps.compress(wrapped)
    ps.sweep(wrapped, [0.5, 0.9], evaluate=lambda m: 1.0)
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(_progress, "_automatic", lambda: True)  # a terminal: after DELAY
    monkeypatch.setattr(_progress, "DELAY", 0.0)
    ps.compress(wrapped)
    assert "3/3" in last_state(capsys.readouterr().err, "compressing")
    monkeypatch.undo()
    monkeypatch.setenv("CI", "true")
    monkeypatch.setattr("sys.stderr.isatty", lambda: True, raising=False)
    assert not _progress._automatic()


def test_compress_folded_sweep_and_allocate_count_their_work(capsys):
    wrapped = calibrated_mlp()
    ps.compress(wrapped, progress=True)
    assert "3/3" in last_state(capsys.readouterr().err, "compressing")
    with ps.folded(wrapped, progress=True):
        pass
    folds = last_state(capsys.readouterr().err, "folds")
    assert "100%" in folds and "3/3 layers" in folds
    calls = []
    ps.sweep(wrapped, [0.5, 0.9, 0.99], evaluate=lambda m: calls.append(1) or 1.0, progress=True)
    err = capsys.readouterr().err
    assert "3/3" in last_state(err, "sweep") and "threshold" in err
    assert len(calls) == 3
    calls.clear()
    ps.allocate(wrapped, lambda m: calls.append(1) or -float(len(calls)) / 1e6, max_drop=1e-3,
                ladder=[0.99, 0.9], progress=True)  # fmt: skip
    state = last_state(capsys.readouterr().err, "allocate")
    assert f"{len(calls)}evaluation" in state.replace(" ", "") and "steps taken" in state
    for silent in (
        lambda: ps.compress(wrapped, progress=False),
        lambda: ps.sweep(wrapped, [0.9], evaluate=lambda m: 1.0, progress=False),
        lambda: ps.allocate(wrapped, lambda m: 1.0, 0.0, ladder=[0.9], progress=False),
    ):
        silent()
        assert capsys.readouterr().err == ""


def test_budget_plan_counts_its_gradient_passes_and_evaluations(capsys):
    wrapped = calibrated_mlp()
    data = [torch.randn(16, 8) for _ in range(4)]

    def loss(m, batch):
        return m(batch).square().mean()

    ps.budget_plan(wrapped, remove=0.3, loss=loss, data=data, progress=True)
    assert "4/4" in last_state(capsys.readouterr().err, "weighing directions")
    calls = []
    plan = ps.budget_plan(wrapped, remove=0.3, evaluate=lambda m: calls.append(1) or 1.0,
                          progress=True)  # fmt: skip
    state = last_state(capsys.readouterr().err, "evaluating plans")
    assert f"{len(calls)}/{len(calls)}" in state and len(calls) == 3 + len(plan)
    ps.budget_plan(wrapped, remove=0.3, loss=loss, data=data, evaluate=lambda m: 1.0,
                   progress=False)  # fmt: skip
    assert capsys.readouterr().err == ""


def test_export_counts_the_forward_the_export_and_each_check(capsys, tmp_path):
    pytest.importorskip("onnxruntime")
    small = ps.compress(calibrated_mlp(), progress=False)
    ps.export_onnx(small, torch.randn(3, 8), tmp_path / "m.onnx", progress=True)
    assert "4/4" in last_state(capsys.readouterr().err, "exporting")  # forward, export, 2 checks
    ps.export_onnx(small, torch.randn(3, 8), tmp_path / "m.onnx", progress=False)
    assert capsys.readouterr().err == ""


def test_bad_progress_values_are_named():
    wrapped = calibrated_mlp()
    for call in (
        lambda: ps.compress(wrapped, progress="yes"),
        lambda: ps.calibrate(wrapped, [torch.randn(4, 8)], progress=1),
        lambda: ps.sweep(wrapped, [0.9], progress="no"),
    ):
        with pytest.raises(TypeError, match="progress must be True, False or None"):
            call()
