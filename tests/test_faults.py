"""Faults, bad input and edge cases: nothing lost, nothing silently wrong.

Each test pins one behaviour at an edge: no data lost, no silently wrong
result, a clear error naming the argument where the input is wrong.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import decaying_data, relative_error
from models import MLP, Branchy, images, warmed_resnet
from torch import nn

import pcasurgery as ps
from pcasurgery import TorchCovarianceMatrix

ROOT = Path(__file__).resolve().parents[1]


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert after[key].device == value.device, key
        assert after[key].shape == value.shape and torch.equal(after[key], value), key


@pytest.fixture
def calibrated_resnet():
    wrapped = ps.pca_wrap(warmed_resnet(), 0.9)
    ps.calibrate(wrapped, images(64).split(16), progress=False)
    ps.set_threshold(wrapped, {"stem": 0.8})
    for layer in ps.pca_layers_of(wrapped).values():
        layer.mode = "auto"
    return wrapped


class Interrupting:
    """A loader that yields some batches, then raises (a KeyboardInterrupt, say)."""

    def __init__(self, batches, error: BaseException):
        self.batches, self.error = batches, error

    def __iter__(self):
        yield from self.batches
        raise self.error


def nan_batch() -> torch.Tensor:
    bad = images(16, seed=5)
    bad[2, 1, 3, 3] = float("nan")
    return bad


# ---------------------------------------------------------------- data loss
@pytest.mark.parametrize("reset", [True, False])
@pytest.mark.parametrize(
    "data, error",
    [
        (Interrupting(images(32, seed=3).split(16), KeyboardInterrupt()), KeyboardInterrupt),
        ([images(16, seed=3), nan_batch()], ValueError),
        ([images(16, seed=3), torch.randn(16, 4, 8, 8)], RuntimeError),
        (Interrupting([images(16, seed=3)], MemoryError("simulated")), MemoryError),
    ],
    ids=["keyboard-interrupt", "nan", "model-error", "loader-error"],
)
def test_a_failed_recalibration_leaves_the_model_exactly_as_it_was(
    calibrated_resnet, data, error, reset
):
    """A re-calibration that fails part-way leaves every layer as it was, none half new."""
    wrapped = calibrated_resnet
    wrapped.train()
    wrapped.fc.eval()
    table = ps.report(wrapped)
    flags = {name: m.training for name, m in wrapped.named_modules()}
    x = images(5, seed=9)
    with torch.no_grad():
        expected = wrapped.eval()(x)  # (the eigenvectors' first use)
    for name, m in wrapped.named_modules():
        m.training = flags[name]
    before = state_of(wrapped)
    with pytest.raises(error):
        ps.calibrate(wrapped, data, progress=False, reset=reset)
    assert_same_state(wrapped, before)
    pd.testing.assert_frame_equal(ps.report(wrapped), table)
    assert {name: m.training for name, m in wrapped.named_modules()} == flags
    assert all(layer.mode == "auto" for layer in ps.pca_layers_of(wrapped).values())
    with torch.no_grad():
        torch.testing.assert_close(wrapped.eval()(x), expected, rtol=0, atol=0)


def test_layers_that_saw_no_data_roll_the_whole_calibration_back():
    class Rare(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.b(x) if x.shape[0] > 100 else self.a(x)

    wrapped = ps.pca_wrap(Rare())
    ps.calibrate(wrapped, [torch.randn(200, 4), torch.randn(20, 4)], progress=False)
    before = state_of(wrapped)
    with pytest.raises(ValueError, match="b saw no data"):
        ps.calibrate(wrapped, [torch.randn(20, 4)], progress=False)
    assert_same_state(wrapped, before)


def test_the_models_own_errors_keep_their_type_with_the_batch_as_context():
    class Failing(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)
            self.calls = 0

        def forward(self, x):
            if bool(x.isnan().any()):  # data-dependent: wrapped at module level, run as written
                return x
            self.calls += 1
            if self.calls == 3:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return self.fc(x)

    wrapped = ps.pca_wrap(Failing())
    with pytest.raises(torch.OutOfMemoryError) as caught:
        ps.calibrate(wrapped, [torch.randn(4, 3)] * 4, progress=False)
    assert "calibration batch 2" in "".join(caught.value.__notes__)


def test_allocate_restores_thresholds_when_the_metric_raises(calibrated_resnet):
    """When evaluate raises, allocate puts every threshold back."""
    thresholds = {n: layer.threshold for n, layer in ps.pca_layers_of(calibrated_resnet).items()}
    calls = []

    def flaky(model):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("metric server unreachable")
        return 1.0

    with pytest.raises(RuntimeError, match="unreachable"):
        ps.allocate(calibrated_resnet, flaky, max_drop=0.1)
    after = {n: layer.threshold for n, layer in ps.pca_layers_of(calibrated_resnet).items()}
    assert after == thresholds and after["stem"] == 0.8


def test_a_device_that_holds_no_data_is_refused_before_the_model_moves(calibrated_resnet):
    """calibrate(device="meta") is refused before any weight moves."""
    before = state_of(calibrated_resnet)
    with pytest.raises(ValueError, match="meta device holds no data"):
        ps.calibrate(calibrated_resnet, [images(4)], device="meta", progress=False)
    assert_same_state(calibrated_resnet, before)
    with pytest.raises(ValueError, match="device must name a torch device"):
        ps.calibrate(calibrated_resnet, [images(4)], device="gpu-please", progress=False)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            ps.calibrate(calibrated_resnet, [images(4)], device="cuda", progress=False)
    assert_same_state(calibrated_resnet, before)


def test_csv_resume_keeps_the_saved_epoch_labels(tmp_path):
    """Resuming at initial_epoch=5 keeps the saved epochs' labels (0-2 stay 0-2)."""
    net = nn.Sequential(nn.Linear(4, 6))
    path = str(tmp_path / "run")
    tracker = ps.CheckLayerSat(path, "csv", net, device="cpu")
    for epoch in range(3):
        net(torch.randn(32, 4))
        tracker.add_scalar("loss", float(epoch))
        tracker.add_saturations()
    tracker.close()
    saved = pd.read_csv(path + ".csv", sep=";", index_col=0)
    assert saved.index.tolist() == [0, 1, 2]
    resumed = ps.CheckLayerSat(path, "csv", net, device="cpu", initial_epoch=5)
    net(torch.randn(32, 4))
    resumed.add_scalar("loss", 5.0)
    resumed.add_saturations()
    resumed.close()
    frame = pd.read_csv(path + ".csv", sep=";", index_col=0)
    assert frame.index.tolist() == [0, 1, 2, 5]
    assert frame.loc[[0, 1, 2], "loss"].tolist() == [0.0, 1.0, 2.0]
    assert frame.loc[5, "loss"] == 5.0


# ------------------------------------------------------------ silently wrong
def _distributed_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        torch.manual_seed(0)
        net = MLP().eval()
        first, second = _shards(rank)
        wrapped = ps.pca_wrap(net, 0.95)
        ps.calibrate(wrapped, first, progress=False)  # rank 2 has no batch at all
        ps.calibrate(wrapped, second, progress=False, reset=False)
        result = {
            name: (layer.samples, layer.eigenvalues, layer.mean)
            for name, layer in ps.pca_layers_of(wrapped).items()
        }
        try:  # an empty union is an error on every rank, not a hang or a crash
            ps.calibrate(wrapped, [], progress=False)
        except ValueError as err:
            result["empty"] = str(err)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _shards(rank: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(rank)
    first = [torch.randn(n, 12, generator=g) + rank for n in (7, 6)] if rank < 2 else []
    second = [torch.randn(4 + rank, 12, generator=g) * 2]
    return first, second


def test_distributed_reset_false_counts_each_sample_once_and_empty_ranks_take_part(tmp_path):
    """Under torch.distributed, reset=False counts each sample once, and a rank with no
    batch takes part in the reduction."""
    world = 3
    mp.spawn(_distributed_worker, args=(world, str(tmp_path / "store"), str(tmp_path)),
             nprocs=world, join=True)  # fmt: skip
    torch.manual_seed(0)
    union = [b for r in range(world) for part in _shards(r) for b in part]
    single = ps.calibrate(ps.pca_wrap(MLP().eval(), 0.95), union, progress=False)
    total = sum(b.shape[0] for b in union)
    assert total == 2 * (7 + 6) + 4 + 5 + 6
    for rank in range(world):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert "no batch" in result.pop("empty")
        for name, layer in ps.pca_layers_of(single).items():
            samples, values, mean = result[name]
            assert samples == total == layer.samples, (rank, name)
            scale = float(layer.eigenvalues.max())
            torch.testing.assert_close(values, layer.eigenvalues, rtol=1e-5, atol=1e-6 * scale)
            torch.testing.assert_close(mean, layer.mean, rtol=1e-6, atol=1e-7)


def test_reset_false_without_distribution_adds_the_new_data_once(calibrated_resnet):
    first, second = images(32, seed=1), images(16, seed=2)
    wrapped = ps.pca_wrap(warmed_resnet(), 0.9)
    ps.calibrate(wrapped, [first], progress=False)
    ps.calibrate(wrapped, [second], progress=False, reset=False)
    union = ps.calibrate(ps.pca_wrap(warmed_resnet(), 0.9), [first, second], progress=False)
    for a, b in zip(ps.pca_layers_of(wrapped).values(), ps.pca_layers_of(union).values(),
                    strict=True):  # fmt: skip
        assert a.samples == b.samples == 48
        torch.testing.assert_close(a.eigenvalues, b.eigenvalues, rtol=1e-5, atol=1e-9)


def test_a_training_phase_after_calibration_starts_fresh_statistics():
    """The first training phase after calibrate starts statistics of its own."""
    x = torch.from_numpy(decaying_data(400, 6))
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 6))
    wrapped = ps.calibrate(ps.pca_wrap(net, 0.99), [x[:200]], progress=False)
    wrapped.train()
    wrapped(x[200:] * 10)  # phase B, in training mode
    wrapped.eval()(x[:1])  # the seed's behaviour: eval computes phase B's eigenspace
    only_b = ps.calibrate(ps.pca_wrap(net, 0.99), [x[200:] * 10], progress=False)
    got, expected = ps.pca_layers_of(wrapped)["0"], ps.pca_layers_of(only_b)["0"]
    assert got.samples == expected.samples == 200
    torch.testing.assert_close(got.eigenvalues, expected.eigenvalues)


def test_loading_a_checkpoint_of_the_other_keepdim_fails_naming_it():
    """Loading a checkpoint saved with the other keepdim fails, naming both values."""
    x = torch.from_numpy(decaying_data(300, 8))
    narrow = ps.LinearPCALayer(8, 0.9, keepdim=False)
    narrow(x)
    narrow.eval()(x[:2])
    wide = ps.LinearPCALayer(8, 0.9, keepdim=True)
    with pytest.raises(RuntimeError, match="saved with keepdim=False, this layer has keepdim=True"):
        wide.load_state_dict(narrow.state_dict())
    assert wide.eval()(x[:2]).shape == (2, 8)
    # a checkpoint from before keepdim was stored still loads (and is still checked)
    legacy = {k: v for k, v in narrow.state_dict().items() if k != "_keepdim"}
    with pytest.raises(RuntimeError, match="keepdim=False"):
        ps.LinearPCALayer(8, 0.9, keepdim=True).load_state_dict(legacy)
    same = ps.LinearPCALayer(8, 0.9, keepdim=False)
    same.load_state_dict(legacy)
    torch.testing.assert_close(same.eval()(x[:2]), narrow(x[:2]))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), {"acc": float("nan")}])
def test_non_finite_metrics_are_refused_naming_the_thresholds(calibrated_resnet, bad):
    """allocate refuses a NaN or infinite metric, naming the thresholds it was measured at."""
    calls = []

    def metric(model):
        calls.append(1)
        return 1.0 if len(calls) < 2 else bad

    before = {n: layer.threshold for n, layer in ps.pca_layers_of(calibrated_resnet).items()}
    with pytest.raises(ValueError, match=r"evaluate\(model\) returned .* at thresholds stem="):
        ps.allocate(calibrated_resnet, metric if not isinstance(bad, dict) else lambda m: bad,
                    max_drop=0.1)  # fmt: skip
    assert {
        n: layer.threshold for n, layer in ps.pca_layers_of(calibrated_resnet).items()
    } == before
    with pytest.raises(ValueError, match=r"at threshold 0.9; it must be finite"):
        ps.sweep(calibrated_resnet, [0.9], evaluate=lambda m: float("nan"))


@pytest.mark.slow
def test_export_honours_or_refuses_the_opset_quietly(tmp_path, capfd):
    """export_onnx writes the opset asked for, or refuses it; it never writes another."""
    onnx = pytest.importorskip("onnx")
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    x = torch.randn(2, 4)
    path = ps.export_onnx(net, x, tmp_path / "m20.onnx", opset=20)
    assert [o.version for o in onnx.load(path).opset_import if o.domain == ""] == [20]
    with pytest.raises(ValueError, match="opset=13: the exporter could not convert"):
        ps.export_onnx(net, x, tmp_path / "m13.onnx", opset=13)
    assert not (tmp_path / "m13.onnx").exists()
    with pytest.raises(ValueError, match="opset must be at most"):
        ps.export_onnx(net, x, tmp_path / "m99.onnx", opset=99)
    printed = capfd.readouterr()
    assert "Traceback" not in printed.out + printed.err


def test_packed_lstm_tracking_with_max_samples_keeps_whole_first_sequences(tmp_path):
    """max_samples on a packed LSTM sequence keeps whole first sequences, not first rows."""
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 5, batch_first=True)
    x = torch.randn(4, 6, 3)
    lengths = torch.tensor([6, 5, 3, 2])
    packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True)
    tracker = ps.CheckLayerSat(str(tmp_path / "t"), "csv", lstm, device="cpu",
                               timeseries_method="timestepwise", max_samples=2)  # fmt: skip
    with torch.no_grad():
        lstm(packed)
        out, _ = lstm(nn.utils.rnn.pack_padded_sequence(x[:2], lengths[:2], batch_first=True))
    padded, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True)
    rows = torch.cat([padded[0, :6], padded[1, :5]]).double().numpy()
    cov = tracker.logs["train-covariance-matrix"]["Module-0-LSTM"]
    assert cov._tlen == 11
    np.testing.assert_allclose(cov.fix().numpy(), np.cov(rows, rowvar=False, bias=True),
                               rtol=1e-5, atol=1e-7)  # fmt: skip
    tracker.close()


def test_a_layer_whose_mean_drifts_keeps_float64_accuracy():
    """Statistics keep float64 accuracy when the mean drifts far from the first batch's."""
    x = decaying_data(3000, 10, decay=0.8)
    x[500:] += 1e6
    layer = ps.LinearPCALayer(10, 0.99)
    for chunk in torch.from_numpy(x).split(500):
        layer(chunk)
    moments = layer.statistics()
    from pcasurgery.core import covariance

    reference = np.cov(x.astype(np.float64), rowvar=False, bias=True)
    assert relative_error(covariance(moments).numpy(), reference) <= 1e-5


# ---------------------------------------------------- crashes, unclear errors
def test_forward_accepts_custom_batch_objects():
    """forward= receives batches of any type, including types pcasurgery does not know."""

    class Batch:
        def __init__(self, x):
            self.x = x

    wrapped = ps.pca_wrap(MLP().eval())
    batches = [Batch(torch.randn(16, 12)) for _ in range(3)]
    ps.calibrate(wrapped, batches, forward=lambda model, b: model(b.x), progress=False)
    assert ps.report(wrapped)["samples"].tolist() == [48, 48, 48]
    with pytest.raises(TypeError, match="max_samples counts input examples"):
        ps.calibrate(wrapped, batches, forward=lambda m, b: m(b.x), max_samples=10,
                     progress=False)  # fmt: skip


def test_empty_batches_are_skipped_everywhere(tmp_path):
    """A batch with no row is skipped by the PCA layers and the seed's covariance alike."""
    x = torch.from_numpy(decaying_data(200, 6))
    net = nn.Sequential(nn.Linear(6, 6))
    wrapped = ps.pca_wrap(net)
    ps.calibrate(wrapped, [x[:0], x[:100], x[:0], x[100:]], progress=False)
    reference = ps.calibrate(ps.pca_wrap(net), [x], progress=False)
    a, b = ps.pca_layers_of(wrapped)["0"], ps.pca_layers_of(reference)["0"]
    assert a.samples == 200
    torch.testing.assert_close(a.eigenvalues, b.eigenvalues)
    cov = TorchCovarianceMatrix(device="cpu")
    cov.update(x[:0])
    cov.update(x)
    np.testing.assert_allclose(cov.fix().numpy(), np.cov(x.double().numpy(), rowvar=False,
                                                         bias=True), rtol=1e-6, atol=1e-9)  # fmt: skip
    net = nn.Sequential(nn.Linear(6, 4))
    tracker = ps.CheckLayerSat(str(tmp_path / "e"), "csv", net, device="cpu")
    net(x[:0])
    net(x)
    assert tracker.add_saturations()["train-saturation_0"] > 0
    tracker.close()


def test_non_finite_outputs_under_tracking_name_the_layer(tmp_path):
    """NaN activations under CheckLayerSat raise an error naming the layer."""
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    tracker = ps.CheckLayerSat(str(tmp_path / "n"), "csv", net, device="cpu")
    x = torch.randn(5, 3)
    x[1, 2] = float("inf")
    with pytest.raises(ValueError, match=r"layer '0' \(train mode\) produced NaN or infinite"):
        net(x)
    tracker.close()


@pytest.mark.slow
def test_float16_models_export_with_a_tolerance_that_follows_the_dtype(tmp_path):
    """A float16 model exports with a tolerance that follows its dtype."""
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).half().eval()
    ps.export_onnx(net, torch.randn(4, 16).half() * 3, tmp_path / "half.onnx")


def test_unclear_errors_are_clear():
    """Bad arguments to pca_wrap, inject_random_directions, set_threshold and CheckLayerSat
    raise errors that name the argument, the value and what is allowed."""
    net = MLP()
    with pytest.raises(TypeError, match=r"targets must be a module class .* got 'Linear'"):
        ps.pca_wrap(net, targets="Linear")
    with pytest.raises(TypeError, match=r"include must be a glob string .* got 5"):
        ps.pca_wrap(net, include=5)
    wrapped = ps.calibrate(ps.pca_wrap(net), [torch.randn(32, 12)], progress=False)
    with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*32\), got -1"):
        ps.inject_random_directions(wrapped, seed=-1)
    with pytest.raises(TypeError, match="include must be a glob string"):
        ps.set_threshold(wrapped, 0.9, include=5)
    with pytest.raises(ValueError, match=r"model is itself a Linear.*nn.Sequential\(model\)"):
        ps.pca_wrap(nn.Linear(3, 3))
    with pytest.raises(TypeError, match="layer_filter must return a dict"):
        ps.CheckLayerSat("unused", "csv", net, device="cpu", layer_filter=lambda layers: None)


def test_unwritable_outputs_are_refused_before_any_work(tmp_path):
    """The demo and the recipes refuse an output path they cannot write before any work."""
    from pcasurgery._demo import run_demo

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        run_demo(blocker)
    with pytest.raises(ValueError, match="cannot be written|is a file"):
        run_demo(blocker / "sub")
    result = subprocess.run(
        [sys.executable, str(ROOT / "recipes" / "sweep_thresholds.py"), "--out",
         str(tmp_path / "missing" / "sweep.csv")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2 and "does not exist" in result.stderr


def test_a_wrapped_model_round_trips_through_pickle_and_deepcopy_with_its_record():
    import copy
    import pickle

    for model in (MLP().eval(), Branchy().eval()):
        wrapped = ps.pca_wrap(model)
        width = 12 if isinstance(model, MLP) else 4
        ps.calibrate(wrapped, [torch.randn(64, width)], progress=False)
        sites = ps.layers.sites_of(wrapped)
        assert {s.attachment for s in sites} == {"module"}
        x = torch.randn(5, width)
        for clone in (copy.deepcopy(wrapped), pickle.loads(pickle.dumps(wrapped))):
            assert ps.layers.sites_of(clone) == sites and type(clone) is type(model)
            assert [type(m).__name__ for m in ps.pca_layers_of(clone).values()] == [
                type(m).__name__ for m in ps.pca_layers_of(wrapped).values()
            ]
            torch.testing.assert_close(clone(x), wrapped(x))


def test_under_sampled_layers_are_named_and_rows_are_reported():
    """Issue 11: a 1000-wide classifier calibrated on 16 examples looked 1.5 % saturated, silently."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 100))
    wrapped = ps.pca_wrap(net)
    # the widening layer 0 is not short of rows: its output's covariance has rank at most
    # its input's width, 8, whatever it sees; the classifier's is short of them
    expected = r"saw fewer samples [^\n]*\n  - 2: 16 rows for width 100$"
    with pytest.warns(UserWarning, match=expected):
        ps.calibrate(wrapped, [torch.randn(16, 8)], progress=False)
    few = r"\n  - 0: 6 rows for width 32 \(input width 8\)\n  - 2: 6 rows for width 100$"
    with pytest.warns(UserWarning, match=few):
        ps.calibrate(ps.pca_wrap(net), [torch.randn(6, 8)], progress=False)
    table = ps.report(wrapped).set_index("layer")
    assert table.loc["2", "rows"] == 16 and table.loc["2", "samples"] == 16
    tokens = ps.calibrate(ps.pca_wrap(nn.Sequential(nn.Linear(8, 6))), [torch.randn(2, 5, 8)],
                          progress=False)  # fmt: skip
    assert ps.report(tokens)[["samples", "rows"]].values.tolist() == [[2, 10]]
