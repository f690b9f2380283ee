"""Saving: every calibrated model's state dict holds tensors of their own.

safetensors (and ``save_pretrained``) refuse two entries that share storage;
``torch.save`` would write them twice and load them as one. A PCA layer keeps
its basis as a view of its eigenvectors, which at full rank is the whole
matrix: whatever state a layer is in, its state dict gives every entry its own
storage, and the saved model loads back with ``weights_only=True`` to the same
outputs.
"""

from __future__ import annotations

import torch
from models import RESNET_TARGETS, ResNet, images

import pcasurgery as ps

safetensors = __import__("pytest").importorskip("safetensors.torch")


def _calibrated(threshold: float) -> torch.nn.Module:
    torch.manual_seed(0)
    model = ResNet().eval()
    wrapped = ps.pca_wrap(model, threshold, include=RESNET_TARGETS)
    ps.calibrate(wrapped, [images(32, seed=s) for s in range(3)], progress=False)
    return wrapped


def _states():
    """A calibrated model in each state whose buffers could alias."""
    yield "threshold 1.0", _calibrated(1.0)
    planned = _calibrated(0.9)
    ps.apply_plan(planned, ps.budget_plan(planned, remove=0.2))
    yield "after apply_plan", planned
    randomised = _calibrated(1.0)
    for layer in ps.pca_layers_of(randomised).values():
        layer.inject_random_directions(layer.width)
    yield "random directions", randomised
    moved = _calibrated(1.0).to(torch.float64).to(torch.float32)
    yield "moved", moved
    mixed = _calibrated(0.99)
    ps.set_threshold(mixed, {"stem": 1.0, "fc": 1.0})
    yield "some at full rank", mixed


def _storages(state: dict[str, torch.Tensor]) -> dict[int, list[str]]:
    seen: dict[int, list[str]] = {}
    for key, value in state.items():
        if value.numel():
            seen.setdefault(value.untyped_storage().data_ptr(), []).append(key)
    return {ptr: keys for ptr, keys in seen.items() if len(keys) > 1}


def test_no_two_state_dict_entries_share_storage_in_any_state(tmp_path):
    x = images(8, seed=9)
    for name, model in _states():
        state = model.state_dict()
        assert not _storages(state), name
        path = tmp_path / f"{name}.safetensors"
        safetensors.save_file(state, path)  # raises on shared tensors
        fresh = _calibrated(0.5)
        fresh.load_state_dict(safetensors.load_file(path))
        fresh.eval(), model.eval()
        with torch.no_grad():
            torch.testing.assert_close(fresh(x), model(x), atol=1e-5, rtol=1e-5, msg=name)
        torch.save(state, tmp_path / "state.pt")
        loaded = torch.load(tmp_path / "state.pt", weights_only=True)
        assert not _storages(loaded), name
        fresh.load_state_dict(loaded)
        with torch.no_grad():
            torch.testing.assert_close(fresh(x), model(x), atol=1e-5, rtol=1e-5, msg=name)


# ---------------------------------------------------------------- save_compressed / load_compressed
def _small(dtype=torch.float32):
    wrapped = _calibrated(0.8)
    return ps.compress(wrapped).to(dtype)


def test_a_compressed_model_loads_into_a_fresh_instance_without_pickles(tmp_path):
    small = _small()
    actions = set(small.compression_report["action"])
    assert {"factorised", "folded"} <= actions and small.compression_report["batchnorm_fused"].any()
    path = tmp_path / "small.safetensors"
    ps.save_compressed(small, path)
    with open(path, "rb") as f:
        assert b"pcasurgery" in f.read(4096)  # the record is in the safetensors header
    fresh = ResNet().eval()
    assert ps.load_compressed(fresh, path) is fresh
    assert ps.count_params(fresh) == ps.count_params(small) < ps.count_params(ResNet())
    x = images(8, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), small(x), atol=0, rtol=0)
    # saved again from the loaded model: the same record, the same weights
    ps.save_compressed(fresh, tmp_path / "again.safetensors")
    again = ps.load_compressed(ResNet().eval(), tmp_path / "again.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(again(x), small(x), atol=0, rtol=0)


def test_the_new_modules_take_the_dtype_of_the_ones_they_replace(tmp_path):
    small = _small(torch.float64)
    ps.save_compressed(small, tmp_path / "small.safetensors")
    fresh = ps.load_compressed(ResNet().to(torch.float64).eval(), tmp_path / "small.safetensors")
    assert {p.dtype for p in fresh.parameters()} == {torch.float64}
    x = images(4).double()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), small(x), atol=0, rtol=0)


def test_a_failed_load_leaves_the_model_as_it_was(tmp_path):
    small = _small()
    ps.save_compressed(small, tmp_path / "small.safetensors")

    class Extended(ResNet):  # the recorded modules fit, the weights do not
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(5))

    target = Extended().eval()
    state = {k: v.clone() for k, v in target.state_dict().items()}
    modules = dict(target.named_modules())
    with __import__("pytest").raises(
        ValueError, match="does not fit Extended: missing \\['scale'\\]"
    ):
        ps.load_compressed(target, tmp_path / "small.safetensors")
    assert dict(target.named_modules()).keys() == modules.keys()
    assert all(m is modules[n] for n, m in target.named_modules())
    assert all(torch.equal(v, state[k]) for k, v in target.state_dict().items())
    assert "_pcasurgery_replaced" not in target.__dict__


def test_bad_input_is_named(tmp_path):
    pytest = __import__("pytest")
    wrapped = _calibrated(0.8)
    with pytest.raises(ValueError, match="still has PCA layers.*compress"):
        ps.save_compressed(wrapped, tmp_path / "x.safetensors")
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        ps.save_compressed({"a": 1}, tmp_path / "x.safetensors")
    with pytest.raises(FileNotFoundError, match="no such file"):
        ps.load_compressed(ResNet(), tmp_path / "missing.safetensors")
    safetensors.save_file(ResNet().state_dict(), tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match="not written by save_compressed"):
        ps.load_compressed(ResNet(), tmp_path / "plain.safetensors")
    ps.save_compressed(_small(), tmp_path / "small.safetensors")
    with pytest.raises(ValueError, match="not in this architecture"):
        ps.load_compressed(
            torch.nn.Sequential(torch.nn.Linear(2, 2)), tmp_path / "small.safetensors"
        )
