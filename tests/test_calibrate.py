"""calibrate: modes and flags, batch layouts, limits, errors, and sharded calibration."""

from __future__ import annotations

import copy
import os

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from models import KeywordModel, images, warmed_resnet
from torch import nn

import pcasurgery as ps


def test_calibration_leaves_batchnorm_and_flags_alone():
    net = warmed_resnet()
    wrapped = ps.pca_wrap(net)
    wrapped.train()
    wrapped.get_submodule("layer1").eval()  # mixed flags must survive
    flags = {name: m.training for name, m in wrapped.named_modules()}
    running = wrapped.get_submodule("bn").running_mean.clone()
    ps.calibrate(wrapped, images(32).split(8), progress=False)
    assert {name: m.training for name, m in wrapped.named_modules()} == flags
    assert torch.equal(wrapped.get_submodule("bn").running_mean, running)
    assert all(layer.mode == "auto" for layer in ps.pca_layers_of(wrapped).values())


def test_dropout_is_off_during_calibration():
    """Two calibrations of a model with dropout give identical statistics."""
    net = warmed_resnet().train()
    results = []
    for _ in range(2):
        wrapped = ps.pca_wrap(net, 0.9)
        ps.calibrate(wrapped, images(32).split(8), progress=False)
        results.append(ps.pca_layers_of(wrapped)["fc"].shifted_sum_sq.clone())
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)


def test_batch_layouts_tensor_tuple_and_dict():
    net = warmed_resnet()
    x = images(48)
    labels = torch.arange(48)
    plain = ps.calibrate(ps.pca_wrap(net), x.split(16), progress=False)
    tupled = ps.calibrate(
        ps.pca_wrap(net), list(zip(x.split(16), labels.split(16), strict=True)), progress=False
    )
    assert ps.report(plain).equals(ps.report(tupled))

    torch.manual_seed(0)
    kw = KeywordModel().eval()
    batches = [{"features": torch.randn(10, 4), "scale": torch.tensor(2.0)} for _ in range(3)]
    wrapped = ps.calibrate(ps.pca_wrap(kw), batches, progress=False)
    assert ps.report(wrapped)["samples"].tolist() == [30]
    custom = ps.calibrate(
        ps.pca_wrap(kw),
        [b["features"] for b in batches],
        forward=lambda m, b: m(b, 2.0),
        progress=False,
    )
    torch.testing.assert_close(
        ps.pca_layers_of(custom)["enc"].eigenvalues, ps.pca_layers_of(wrapped)["enc"].eigenvalues
    )


def test_max_samples_and_max_batches_count_input_examples():
    net = warmed_resnet()
    x = images(64)
    wrapped = ps.calibrate(ps.pca_wrap(net), x.split(16), max_samples=40, progress=False)
    table = ps.report(wrapped)
    assert table["samples"].tolist() == [40] * 7
    stem = ps.pca_layers_of(wrapped)["stem"]
    assert int(stem.sample_count) == 40 * 8 * 8  # conv positions, but 40 examples
    reference = ps.calibrate(ps.pca_wrap(net), [x[:40]], progress=False)
    torch.testing.assert_close(
        ps.pca_layers_of(reference)["fc"].eigenvalues, ps.pca_layers_of(wrapped)["fc"].eigenvalues
    )
    batches = ps.calibrate(ps.pca_wrap(net), x.split(16), max_batches=3, progress=False)
    assert ps.report(batches)["samples"].tolist() == [48] * 7


def test_reset_false_adds_to_previous_statistics():
    net = warmed_resnet()
    x = images(64)
    wrapped = ps.calibrate(ps.pca_wrap(net), x[:32].split(16), progress=False)
    ps.calibrate(wrapped, x[32:].split(16), progress=False, reset=False)
    once = ps.calibrate(ps.pca_wrap(net), x.split(16), progress=False)
    assert ps.report(wrapped)["samples"].tolist() == [64] * 7
    for a, b in zip(
        ps.pca_layers_of(wrapped).values(), ps.pca_layers_of(once).values(), strict=True
    ):
        scale = float(b.eigenvalues.max())  # rank-deficient layers: compare on the spectrum's scale
        torch.testing.assert_close(a.eigenvalues, b.eigenvalues, rtol=1e-5, atol=1e-6 * scale)
    again = ps.calibrate(wrapped, x[:32].split(16), progress=False)  # reset=True by default
    assert ps.report(again)["samples"].tolist() == [32] * 7


def test_progress_bar_reports_samples(capsys):
    net = warmed_resnet()
    ps.calibrate(ps.pca_wrap(net), images(32).split(16), progress=True)
    err = capsys.readouterr().err
    assert "calibrating" in err and "32" in err and "samples/s" in err


def test_calibration_errors_are_clear():
    net = warmed_resnet()
    wrapped = ps.pca_wrap(net)
    with pytest.raises(ValueError, match="data yielded no batch"):
        ps.calibrate(wrapped, [], progress=False)
    # the model's own error keeps its type; the batch index and shapes come as a note
    with pytest.raises(RuntimeError, match="expected input") as caught:
        ps.calibrate(wrapped, [images(16), torch.randn(16, 4, 8, 8)], progress=False)
    assert "calibration batch 1, tensor shapes (16, 4, 8, 8)" in caught.value.__notes__[0]
    bad = images(16)
    bad[3, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="'stem' received NaN or infinite activations"):
        ps.calibrate(wrapped, [bad], progress=False)
    with pytest.raises(ValueError, match="has no PCA layer"):
        ps.calibrate(net, [images(4)], progress=False)
    with pytest.raises(TypeError, match="data must be an iterable of batches"):
        ps.calibrate(wrapped, images(4), progress=False)
    with pytest.raises(ValueError, match="max_samples must be >= 1"):
        ps.calibrate(wrapped, [images(4)], max_samples=0, progress=False)
    with pytest.raises(TypeError, match="a calibration batch must be a tensor"):
        ps.calibrate(wrapped, ["not a batch"], progress=False)
    with pytest.raises(TypeError, match="eigenvectors"):
        ps.calibrate(wrapped, [images(4)], progress=False, eigenvectors="yes")
    # flags and modes are restored even after an error
    assert all(layer.mode == "auto" for layer in ps.pca_layers_of(wrapped).values())
    assert not wrapped.training


def test_report_and_plot(tmp_path):
    net = warmed_resnet()
    wrapped = ps.pca_wrap(net, 0.95)
    with pytest.raises(ps.NotCalibratedError, match="stem, layer1.0.conv1"):
        ps.report(wrapped)
    ps.calibrate(wrapped, images(64).split(16), progress=False)
    table = ps.report(wrapped)
    for column in (
        "layer",
        "kind",
        "width",
        "idim",
        "saturation",
        "threshold",
        "centering",
        "samples",
        "explained",
    ):
        assert column in table.columns
    assert table["layer"].tolist() == list(ps.pca_layers_of(wrapped))
    np.testing.assert_allclose(table["saturation"], table["idim"] / table["width"])
    assert (table["explained"] >= 0.95).all() and (table["threshold"] == 0.95).all()
    assert table["kind"].tolist() == ["conv2d"] * 5 + ["linear"] * 2
    assert table["follows"].tolist() == table["layer"].tolist()  # from the record of pca_wrap
    assert set(table["attachment"]) == {"module"}
    fig = ps.plot_saturation(table, tmp_path / "sat.png")
    assert (tmp_path / "sat.png").stat().st_size > 5000
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == table["layer"].tolist()
    with pytest.raises(ValueError, match="does not exist"):
        ps.plot_saturation(table, tmp_path / "missing" / "sat.png")


def test_network_wide_threshold_centering_and_random_directions():
    net = warmed_resnet()
    wrapped = ps.calibrate(ps.pca_wrap(net, 0.99), images(64).split(16), progress=False)
    ps.set_threshold(wrapped, {"*": 0.9, "layer1.*": 0.5})
    table = ps.report(wrapped).set_index("layer")
    assert table.loc["layer1.0.conv1", "threshold"] == 0.5 and table.loc["stem", "threshold"] == 0.9
    ps.set_threshold(wrapped, 0.8, include="fc")
    assert ps.report(wrapped).set_index("layer").loc["fc", "threshold"] == 0.8
    ps.set_centering(wrapped, False, include="head")
    assert not ps.pca_layers_of(wrapped)["head"].centering
    ps.inject_random_directions(wrapped, seed=0, include="layer1.*")
    flags = ps.report(wrapped).set_index("layer")["random_directions"]
    assert flags["layer1.0.conv1"] and not flags["stem"]
    with pytest.raises(ValueError, match="matches no PCA layer"):
        ps.set_threshold(wrapped, 0.9, include="nope*")
    with pytest.raises(ValueError, match=r"threshold\['stem'\] must be in \(0, 1\]"):
        ps.set_threshold(wrapped, {"stem": 3})


# ---------------------------------------------------------------- distributed
def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        net = warmed_resnet()
        shard = images(96)[rank::world] + 3.0 * rank  # ranks see different distributions
        wrapped = ps.calibrate(ps.pca_wrap(net, 0.95), shard.split(8), progress=False)
        torch.save(
            {
                name: (
                    layer.eigenvalues,
                    layer.mean,
                    layer.in_dim,
                    layer.samples,
                    layer.projection_weight,
                )
                for name, layer in ps.pca_layers_of(wrapped).items()
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_calibration_equals_one_process_on_the_union(tmp_path):
    world = 2
    mp.spawn(_worker, args=(world, str(tmp_path / "store"), str(tmp_path)), nprocs=world, join=True)
    net = warmed_resnet()
    union = torch.cat([images(96)[r::world] + 3.0 * r for r in range(world)])
    single = ps.calibrate(ps.pca_wrap(net, 0.95), union.split(8), progress=False)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    for name, layer in ps.pca_layers_of(single).items():
        for result in results:
            values, mean, k, samples, weight = result[name]
            assert k == layer.in_dim and samples == 96, name
            torch.testing.assert_close(values, layer.eigenvalues, rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(mean, layer.mean, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(weight, layer.projection_weight, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_calibration_on_cuda_matches_cpu():
    net = warmed_resnet()
    x = images(64)
    cpu = ps.calibrate(ps.pca_wrap(net, 0.95), x.split(16), progress=False)
    gpu = ps.calibrate(
        ps.pca_wrap(net, 0.95), [b.pin_memory() for b in x.split(16)], device="cuda", progress=False
    )
    for a, b in zip(ps.pca_layers_of(cpu).values(), ps.pca_layers_of(gpu).values(), strict=True):
        assert a.in_dim == b.in_dim
        torch.testing.assert_close(a.eigenvalues, b.eigenvalues.cpu(), rtol=1e-4, atol=1e-6)
    y = gpu(x[:4].cuda())
    torch.testing.assert_close(y.cpu(), cpu(x[:4]), rtol=1e-3, atol=1e-4)
    bad = x[:8].clone()
    bad[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or infinite"):
        ps.calibrate(gpu, [bad], device="cuda", progress=False)


class TokenModel(nn.Module):
    """Per-token layers after an embedding, as in a transformer's MLP; takes tokenizer dicts."""

    def __init__(self, vocab: int = 30, width: int = 8):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.up = nn.Linear(width, 16)
        self.down = nn.Linear(16, width)
        self.pool = nn.Linear(width, 3)

    def forward(self, input_ids, attention_mask):
        h = self.down(torch.relu(self.up(self.embed(input_ids))))
        weights = attention_mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * weights).sum(1) / weights.sum(1)  # mean over real tokens
        return self.pool(pooled)


def test_padding_never_enters_the_statistics():
    torch.manual_seed(0)
    model = TokenModel().eval()
    g = torch.Generator().manual_seed(3)
    lengths = [7, 3, 5, 1, 6, 2]
    sequences = [torch.randint(1, 30, (n,), generator=g) for n in lengths]
    padded = torch.zeros(len(sequences), max(lengths), dtype=torch.long)  # pad id 0
    mask = torch.zeros_like(padded)
    for i, seq in enumerate(sequences):
        padded[i, : len(seq)] = seq
        mask[i, : len(seq)] = 1
    with_padding = ps.calibrate(
        ps.pca_wrap(model, 0.9), [{"input_ids": padded, "attention_mask": mask}], progress=False
    )
    unpadded = ps.calibrate(
        ps.pca_wrap(model, 0.9),
        [{"input_ids": s[None], "attention_mask": torch.ones(1, len(s), dtype=torch.long)}
         for s in sequences],
        progress=False,
    )  # fmt: skip
    for name in ("up", "down", "pool"):
        a, b = ps.pca_layers_of(with_padding)[name], ps.pca_layers_of(unpadded)[name]
        assert int(a.sample_count) == int(b.sample_count), name
        scale = float(b.eigenvalues.max())  # rank-deficient layers: compare on the spectrum's scale
        torch.testing.assert_close(a.eigenvalues, b.eigenvalues, rtol=1e-5, atol=1e-6 * scale)
        torch.testing.assert_close(a.mean, b.mean, rtol=1e-5, atol=1e-6)
    up = ps.pca_layers_of(with_padding)["up"]
    assert int(up.sample_count) == sum(lengths) and up.samples == len(lengths)
    assert int(ps.pca_layers_of(with_padding)["pool"].sample_count) == len(lengths)


def test_a_mask_without_padding_copies_no_token_and_changes_no_statistic(monkeypatch):
    from pcasurgery.layers.pca import LinearPCALayer

    torch.manual_seed(0)
    model = TokenModel().eval()
    ids = torch.randint(1, 30, (4, 6))
    ones = torch.ones_like(ids)
    seen = []
    samples_of = LinearPCALayer._samples_of

    def spy(self, x):
        out = samples_of(self, x)
        seen.append(out is x)
        return out

    monkeypatch.setattr(LinearPCALayer, "_samples_of", spy)
    masked = ps.calibrate(
        ps.pca_wrap(model, 0.9), [{"input_ids": ids, "attention_mask": ones}], progress=False
    )
    assert seen == [True, True, True]  # up's input, down's output, pool's: as the model made them
    half = ones.clone()
    half[0, 3:] = 0
    seen.clear()
    ps.calibrate(
        ps.pca_wrap(model, 0.9), [{"input_ids": ids, "attention_mask": half}], progress=False
    )
    assert seen == [False, False, True]  # the real tokens copied out; the pooled rows whole
    unmasked = ps.calibrate(
        ps.pca_wrap(model, 0.9),
        [ids],
        forward=lambda m, b: m(b, torch.ones_like(b)),
        progress=False,
    )
    for name, layer in ps.pca_layers_of(masked).items():
        other = ps.pca_layers_of(unmasked)[name]
        assert torch.equal(layer.eigenvalues, other.eigenvalues), name
        assert int(layer.sample_count) == int(other.sample_count), name


def test_eigenspaces_computed_side_by_side_match_numpy_and_keep_the_thread_count():
    from pcasurgery.layers.decompose import compute_eigenspaces

    torch.manual_seed(0)
    widths = [5, 40, 17, 40, 3]
    data = [torch.randn(300, w) @ torch.randn(w, w) + 3.0 for w in widths]
    pooled = [ps.LinearPCALayer(w, 0.9) for w in widths]
    alone = [ps.LinearPCALayer(w, 0.9) for w in widths]
    for a, b, x in zip(pooled, alone, data, strict=True):
        a.collect(x)
        b.collect(x)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        compute_eigenspaces(pooled)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    for a, b, x in zip(pooled, alone, data, strict=True):
        b.compute_eigenspace()
        expected = np.linalg.eigvalsh(np.cov(x.double().numpy().T, bias=True))[::-1]
        np.testing.assert_allclose(a.eigenvalues.numpy(), expected, atol=1e-5 * expected[0])
        assert a.in_dim == b.in_dim
        torch.testing.assert_close(a.projection_weight, b.projection_weight)


def test_offloaded_tensors_on_the_meta_device_are_refused_before_any_work():
    """accelerate's disk offload leaves meta tensors in place of weights and PCA buffers."""
    wrapped = ps.pca_wrap(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)), 0.9)
    ps.calibrate(wrapped, [torch.randn(32, 6)], progress=False)
    before = {k: v.clone() for k, v in wrapped.state_dict().items() if not k.startswith("2.")}
    wrapped[2].to("meta")  # the module and its PCA layer, offloaded
    with pytest.raises(ValueError, match="'2' or the module it follows holds tensors on the meta"):
        ps.calibrate(wrapped, [torch.randn(32, 6)], progress=False)
    for key, value in before.items():
        assert torch.equal(wrapped.state_dict()[key], value), key


def test_calibration_decomposes_for_the_spectrum_and_eigenvectors_come_at_first_use(monkeypatch):
    from pcasurgery.core import spectrum

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 6)).eval()
    data = [torch.randn(64, 12) @ torch.diag(torch.logspace(0, -2, 12)) for _ in range(3)]
    eager = ps.calibrate(ps.pca_wrap(net, 0.9), data, progress=False)
    for layer in ps.pca_layers_of(eager).values():
        layer.compute_eigenvectors()
    calls = {"eigh": 0, "eigvalsh": 0}
    eigh, eigvalsh = spectrum.eigh_descending, spectrum.eigvalsh_descending
    monkeypatch.setattr(
        spectrum,
        "eigh_descending",
        lambda m: calls.__setitem__("eigh", calls["eigh"] + 1) or eigh(m),
    )
    monkeypatch.setattr(spectrum, "eigvalsh_descending",
                        lambda m: calls.__setitem__("eigvalsh", calls["eigvalsh"] + 1) or eigvalsh(m))  # fmt: skip
    lazy = ps.calibrate(ps.pca_wrap(net, 0.9), data, progress=False)
    table = ps.report(lazy)
    assert calls == {"eigh": 0, "eigvalsh": 2}  # a report reads eigenvalues only
    assert all(layer.eigenvectors_pending for layer in ps.pca_layers_of(lazy).values())
    pd.testing.assert_frame_equal(table, ps.report(eager))
    saved = copy.deepcopy(lazy.state_dict())  # saved with the eigenvectors still to come
    x = torch.randn(5, 12)
    with torch.no_grad():
        torch.testing.assert_close(lazy(x), eager(x), atol=1e-6, rtol=1e-6)
        lazy(x)
    assert calls["eigh"] == 2 and not any(
        layer.eigenvectors_pending for layer in ps.pca_layers_of(lazy).values()
    )
    restored = ps.pca_wrap(net, 0.5)
    restored.load_state_dict(saved)
    with torch.no_grad():
        torch.testing.assert_close(restored.eval()(x), eager(x), atol=1e-6, rtol=1e-6)
    # statistics about to be forgotten give the pending eigenvectors first
    again = ps.calibrate(ps.pca_wrap(net, 0.9), data, progress=False)
    for layer in ps.pca_layers_of(again).values():
        layer.reset_statistics()
    with torch.no_grad():
        torch.testing.assert_close(again(x), eager(x), atol=1e-6, rtol=1e-6)
    # asked for now, the eigenvectors come with the eigenvalues: one eigh a layer, no eigvalsh
    before = dict(calls)
    now = ps.calibrate(ps.pca_wrap(net, 0.9), data, progress=False, eigenvectors=True)
    assert calls == {"eigh": before["eigh"] + 2, "eigvalsh": before["eigvalsh"]}
    assert not any(layer.eigenvectors_pending for layer in ps.pca_layers_of(now).values())
    pd.testing.assert_frame_equal(ps.report(now), ps.report(eager))
    with torch.no_grad():
        torch.testing.assert_close(now(x), eager(x), atol=1e-6, rtol=1e-6)
    assert calls["eigh"] == before["eigh"] + 2
