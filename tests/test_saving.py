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
