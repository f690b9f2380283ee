"""``compress_sequential``: a stack of blocks calibrated and compressed one block at a time.

References built from the whole-model API: with the dense activations passed
on and a global plan it equals whole-model calibration, ``apply_plan`` and
``compress``; with the compressed activations passed on it equals wrapping,
calibrating and compressing the whole model's blocks one after another.
"""

from __future__ import annotations

import copy
import functools
import gc
import warnings
import weakref

import pandas as pd
import pytest
import torch
from models import decoder_config, token_batches

import pcasurgery as ps

transformers = pytest.importorskip("transformers")


def _llama(layers: int = 3):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**decoder_config(num_hidden_layers=layers))
    return transformers.LlamaForCausalLM(config).eval()


def _logits(model, prompt):
    with torch.no_grad():
        return model(input_ids=prompt, use_cache=False).logits


def _gpt2(layers: int = 2):
    """GPT-2 passes its key/value cache to each block positionally."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=layers, n_head=4)
    return transformers.GPT2LMHeadModel(config).eval()


def _whole_model(model, data, remove, blocks="model.layers.*"):
    """The whole-model procedure: its plan and the compressed model."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = ps.pca_wrap(model, include=blocks)
    ps.calibrate(wrapped, data, progress=False)
    plan = ps.budget_plan(wrapped, remove=remove)
    ps.apply_plan(wrapped, plan)
    return plan, ps.compress(wrapped)


PROMPT = torch.randint(3, 96, (2, 9), generator=torch.Generator().manual_seed(4))


@pytest.mark.parametrize("build, blocks", [(_llama, "model.layers.*"), (_gpt2, "transformer.h.*")])
def test_passing_the_dense_activations_on_equals_whole_model_compression(build, blocks):
    model, data = build(), token_batches(96)
    plan, whole = _whole_model(model, data, remove=0.3, blocks=blocks)
    sequential = ps.compress_sequential(
        copy.deepcopy(model), data, blocks=blocks, plan=plan, propagate="original"
    )
    assert list(sequential.compression_report["layer"]) == list(whole.compression_report["layer"])
    assert list(sequential.compression_report["k"]) == list(plan["k"])
    assert ps.count_params(sequential) == ps.count_params(whole) < ps.count_params(model)
    torch.testing.assert_close(
        _logits(sequential, PROMPT), _logits(whole, PROMPT), atol=1e-5, rtol=1e-5
    )
    # a backward through each block (the loss's gradients) keeps no key/value cache either
    planning = token_batches(96, count=2, batch=3, length=20)
    weighed = ps.compress_sequential(
        copy.deepcopy(model), data, blocks=blocks, plan=plan, loss=_lm_loss, loss_data=planning
    )
    assert list(weighed.compression_report["k"]) == list(plan["k"])


def test_passing_the_compressed_activations_on_equals_compressing_block_after_block():
    model, data = _llama(), token_batches(96)
    reference = copy.deepcopy(model)
    for i in range(3):  # each block calibrated in the model whose earlier blocks are compressed
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wrapped = ps.pca_wrap(reference, include=f"model.layers.{i}.*")
        ps.calibrate(wrapped, data, progress=False)
        ps.apply_plan(wrapped, ps.budget_plan(wrapped, remove=0.3))
        reference = ps.compress(wrapped)
    sequential = ps.compress_sequential(
        copy.deepcopy(model), data, blocks="model.layers.*", remove=0.3, budget="per-block"
    )
    assert ps.count_params(sequential) == ps.count_params(reference) < ps.count_params(model)
    torch.testing.assert_close(
        _logits(sequential, PROMPT), _logits(reference, PROMPT), atol=1e-5, rtol=1e-5
    )
    # and it differs from passing the dense activations on
    dense_on = ps.compress_sequential(
        copy.deepcopy(model),
        data,
        blocks="model.layers.*",
        remove=0.3,
        budget="per-block",
        propagate="original",
    )
    assert not torch.allclose(_logits(dense_on, PROMPT), _logits(sequential, PROMPT), atol=1e-4)


def test_one_block_is_calibrated_at_a_time_and_the_result_ships(monkeypatch, tmp_path):
    model, data = _llama(), token_batches(96)
    seen = []
    calibrate = ps.analysis.sequential.calibrate

    def counting(wrapped, *args, **kwargs):
        seen.append(len(ps.pca_layers_of(wrapped)))
        return calibrate(wrapped, *args, **kwargs)

    monkeypatch.setattr(ps.analysis.sequential, "calibrate", counting)
    small = ps.compress_sequential(model, data, blocks="model.layers.*", remove=0.3)
    assert seen == [7] * 6  # q, k, v, o, gate, up, down of one block; two passes (global budget)
    assert not ps.pca_layers_of(small)
    small.save_pretrained(tmp_path)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True)
    assert ps.count_params(again) == ps.count_params(small)
    torch.testing.assert_close(_logits(again, PROMPT), _logits(small, PROMPT))


def test_a_block_is_held_once_and_its_layers_decomposed_one_after_another(monkeypatch):
    """Block by block, the memory is one block's: the wrapped copy holds the block's own
    weights (calibration reads them, ``compress`` reads those it replaces), and the block's
    eigenvectors are computed one layer after another, not one per worker side by side.
    The first pass's eigenvalues alone (little memory each) are computed side by side."""
    import sys
    import threading

    from pcasurgery.analysis import sequential
    from pcasurgery.layers import decompose

    model, data = _llama(2), token_batches(96)
    own = {p.data_ptr() for p in model.model.layers.parameters()}
    wrapped_held, read, threads = [], [], {True: set(), False: set()}
    calibrate, install = sequential.calibrate, decompose._install
    module = sys.modules["pcasurgery.compression.compress"]
    pair = module._compress_pair

    def calibrating(wrapped, *args, **kwargs):
        wrapped_held.append({p.data_ptr() for p in wrapped.parameters()} <= own)
        return calibrate(wrapped, *args, **kwargs)

    def installing(layer, vectors=True, release=False):
        threads[vectors].add(threading.current_thread().name)
        return install(layer, vectors, release)

    def reading(layer, followed, plan):
        read.append(followed.weight.data_ptr() in own)
        return pair(layer, followed, plan)

    monkeypatch.setattr(sequential, "calibrate", calibrating)
    monkeypatch.setattr(decompose, "_install", installing)
    monkeypatch.setattr(module, "_compress_pair", reading)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(2)  # side by side, elsewhere
    try:
        ps.compress_sequential(model, data, blocks="model.layers.*", remove=0.3)
    finally:
        torch.set_num_threads(threads_before)
    assert wrapped_held == [True] * 4  # two passes (global budget)
    assert read == [True] * 14
    assert threads[True] == {threading.current_thread().name}
    assert len(threads[False]) == 2 and all(n.startswith("pcasurgery") for n in threads[False])


def test_a_blocks_statistics_are_freed_as_its_layers_eigenspaces_are_installed(monkeypatch):
    """While a block's eigenvectors are computed, the statistics of the layers already
    decomposed are freed (their eigenspaces are all that is read after): the statistics
    and the eigenvectors of a block are never all held at once. ``calibrate`` itself
    keeps its statistics."""
    from pcasurgery.layers.pca import PCALayer

    model, data = _llama(2), token_batches(96)
    installed, held = [], []
    install = PCALayer._install_spectrum

    def recording(self, values, vectors):
        held.append(sum(layer.has_statistics for layer in installed))
        installed.append(self)
        return install(self, values, vectors)

    monkeypatch.setattr(PCALayer, "_install_spectrum", recording)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = ps.pca_wrap(copy.deepcopy(model), include="model.layers.*")
    ps.calibrate(wrapped, data, progress=False, eigenvectors=True)
    layers = ps.pca_layers_of(wrapped).values()
    assert len(held) == len(layers) and all(layer.has_statistics for layer in layers)
    installed.clear()
    held.clear()
    ps.compress_sequential(model, data, blocks="model.layers.*", remove=0.3)
    assert len(held) == len(layers) and held == [0] * len(layers)


@pytest.mark.parametrize("propagate", ["compressed", "original"])
def test_each_dense_block_is_freed_once_compressed_and_only_the_activations_passed_on_kept(
    monkeypatch, propagate
):
    """One block's memory: when a block is compressed, the dense blocks before it are gone,
    the first one too, and the dense block's outputs are kept only to be passed on."""
    from pcasurgery.analysis import sequential

    model, data = _llama(3), token_batches(96)
    refs = [weakref.ref(block) for block in model.model.layers]
    alive, kept = [], []
    compress_block, calibrated = sequential._compress_block, sequential._calibrated

    def compressing(block, name, *args, **kwargs):
        alive.append([ref() is not None for ref in refs])
        return compress_block(block, name, *args, **kwargs)

    def calibrating(wrapped, inputs, eigenvectors=False, keep=True):
        kept.append(keep)
        return calibrated(wrapped, inputs, eigenvectors, keep)

    monkeypatch.setattr(sequential, "_compress_block", compressing)
    monkeypatch.setattr(sequential, "_calibrated", calibrating)
    ps.compress_sequential(
        model, data, blocks="model.layers.*", remove=0.3, budget="per-block", propagate=propagate
    )
    assert alive == [[True, True, True], [False, True, True], [False, False, True]]
    assert kept == [propagate == "original"] * 3


def test_bad_arguments_are_named():
    model, data = _llama(1), token_batches(96)
    with pytest.raises(ValueError, match="either remove .* or plan"):
        ps.compress_sequential(model, data, blocks="model.layers.*")
    with pytest.raises(ValueError, match="propagate must be one of"):
        ps.compress_sequential(model, data, blocks="model.layers.*", remove=0.2, propagate="dense")
    with pytest.raises(ValueError, match="blocks='decoder.\\*' matches no module"):
        ps.compress_sequential(model, data, blocks="decoder.*", remove=0.2)
    with pytest.raises(ValueError, match="at least one batch"):
        ps.compress_sequential(model, [], blocks="model.layers.*", remove=0.2)


def test_a_global_budget_from_the_eigenvalues_of_a_first_pass_equals_the_whole_models():
    model, data = _llama(), token_batches(96)
    plan, whole = _whole_model(model, data, remove=0.3)
    sequential = ps.compress_sequential(
        copy.deepcopy(model), data, blocks="model.layers.*", remove=0.3, propagate="original"
    )
    assert list(sequential.compression_report["k"]) == list(plan["k"])  # the same allocation
    assert ps.count_params(sequential) == ps.count_params(whole)
    torch.testing.assert_close(
        _logits(sequential, PROMPT), _logits(whole, PROMPT), atol=1e-5, rtol=1e-5
    )
    per_block = ps.compress_sequential(
        copy.deepcopy(model), data, blocks="model.layers.*", remove=0.3, budget="per-block"
    )
    assert list(per_block.compression_report["k"]) != list(plan["k"])


def _on_meta(layers: int = 3):
    from accelerate import init_empty_weights

    config = transformers.LlamaConfig(**decoder_config(num_hidden_layers=layers))
    with init_empty_weights():
        return transformers.LlamaForCausalLM(config).eval()


def _loaded_blocks(model) -> int:
    return sum(
        not next(block.parameters()).is_meta
        for block in model.model.layers
        if len(list(block.parameters()))
    )


def test_a_model_on_meta_is_calibrated_from_its_shards_one_block_at_a_time(tmp_path):
    model, data = _llama(), token_batches(96)
    model.save_pretrained(tmp_path / "dense", max_shard_size="20KB")  # several shards
    assert len(list((tmp_path / "dense").glob("*.safetensors"))) > 1
    empty = _on_meta()
    resident = []
    for block in empty.model.layers:
        block.register_forward_pre_hook(lambda *_: resident.append(_loaded_blocks(empty)))
    spectra = ps.calibrate_sequential(
        empty, data, blocks="model.layers.*", weights=tmp_path / "dense"
    )
    assert resident and max(resident) == 1  # one block's weights in memory at a time
    assert _loaded_blocks(empty) == 0
    reference = ps.calibrate_sequential(copy.deepcopy(model), data, blocks="model.layers.*")
    ours, theirs = ps.report(spectra), ps.report(reference)
    assert list(ours["layer"]) == [
        f"model.{n}" for n in ps.pca_layers_of(ps.pca_wrap(model.model, include="layers.*"))
    ]
    assert ours.drop(columns="layer").equals(theirs.drop(columns="layer"))
    # the spectra are the whole model's: the same eigenvalues as calibrating it at once
    whole = ps.pca_wrap(model, include="model.layers.*")
    ps.calibrate(whole, data, progress=False)
    for name, layer in ps.pca_layers_of(whole).items():
        torch.testing.assert_close(
            ps.pca_layers_of(spectra)[name].eigenvalues, layer.eigenvalues, atol=1e-9, rtol=1e-6
        )


def test_a_model_on_meta_is_compressed_from_its_shards_into_a_checkpoint(tmp_path):
    model, data = _llama(), token_batches(96)
    model.save_pretrained(tmp_path / "dense", max_shard_size="20KB")
    plan = ps.budget_plan(
        ps.calibrate_sequential(copy.deepcopy(model), data, blocks="model.layers.*"), remove=0.3
    )
    in_memory = ps.compress_sequential(
        copy.deepcopy(model), data, blocks="model.layers.*", plan=plan
    )
    empty = _on_meta()
    resident = []
    for block in empty.model.layers:
        block.register_forward_pre_hook(lambda *_: resident.append(_loaded_blocks(empty)))
    result = ps.compress_sequential(
        empty, data, blocks="model.layers.*", plan=plan, weights=tmp_path / "dense",
        out=tmp_path / "small",
    )  # fmt: skip
    assert max(resident) <= 1 and _loaded_blocks(result) == 0  # written, then released
    files = sorted(p.name for p in (tmp_path / "small").iterdir())
    assert [f for f in files if f.startswith("block-")] == [
        f"block-0000{i}.safetensors" for i in range(3)
    ]
    assert {"config.json", "model.safetensors.index.json", "modeling_pcasurgery.py"} <= set(files)
    again = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "small", trust_remote_code=True
    )
    assert type(again).__name__ == "CompressedLlamaForCausalLM"
    assert ps.count_params(again) == ps.count_params(in_memory) < ps.count_params(model)
    torch.testing.assert_close(_logits(again, PROMPT), _logits(in_memory, PROMPT))
    assert result.compression_report.equals(in_memory.compression_report)
    # the compressed model, its blocks on meta, evaluated from what was written
    logits = ps.forward_sequential(
        result, data, blocks="model.layers.*", weights=tmp_path / "small", forward=_batch_logits
    )
    for got, batch in zip(logits, data, strict=True):
        torch.testing.assert_close(got, _batch_logits(in_memory, batch))


def test_a_checkpoint_written_in_bfloat16_holds_bfloat16_tensors(tmp_path):
    from safetensors import safe_open

    model, data = _llama(2), token_batches(96)
    reference = ps.compress_sequential(
        copy.deepcopy(model), data, blocks="model.layers.*", remove=0.3, budget="per-block"
    )
    ps.compress_sequential(
        model, data, blocks="model.layers.*", remove=0.3, budget="per-block",
        out=tmp_path / "small", out_dtype=torch.bfloat16,
    )  # fmt: skip
    for file in (tmp_path / "small").glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as handle:
            assert {handle.get_tensor(k).dtype for k in handle.keys()} == {torch.bfloat16}
    again = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "small", trust_remote_code=True
    )
    torch.testing.assert_close(
        _logits(again.float(), PROMPT), _logits(reference, PROMPT), atol=0.05, rtol=0.05
    )


def test_weights_and_out_are_checked_before_any_work(tmp_path):
    data = token_batches(96)
    with pytest.raises(ValueError, match="weights=.* is not a safetensors file nor a folder"):
        ps.calibrate_sequential(
            _on_meta(1), data, blocks="model.layers.*", weights=tmp_path / "none"
        )
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("x")
    with pytest.raises(ValueError, match="out=.* exists and is not an empty folder"):
        ps.compress_sequential(
            _llama(1), data, blocks="model.layers.*", remove=0.2, out=tmp_path / "full"
        )
    with pytest.raises(TypeError, match="out_dtype must be a floating torch.dtype"):
        ps.compress_sequential(
            _llama(1),
            data,
            blocks="model.layers.*",
            remove=0.2,
            out=tmp_path / "o",
            out_dtype="bf16",
        )
    model = _llama(1)
    partial = {k: v for k, v in model.state_dict().items() if "mlp.down_proj" not in k}
    from safetensors.torch import save_file

    save_file(
        {k: v.contiguous() for k, v in partial.items()},
        str(tmp_path / "p.safetensors"),
    )
    with pytest.raises(
        ValueError, match="not in the checkpoint: model.layers.0.mlp.down_proj.weight"
    ):
        ps.calibrate_sequential(
            _on_meta(1), data, blocks="model.layers.*", weights=tmp_path / "p.safetensors"
        )


def _held_bytes(layer) -> int:
    """The bytes of a PCA layer's statistics, eigenvectors and square factors (with what
    their eigenvalues left for the eigenvectors)."""
    tensors = [layer._buffers[name] for name in ("shifted_sum_sq", "eigenvectors")]
    factors = layer._square_factors
    if factors is not None:
        tensors += [factors.weight, factors.inputs.total_sq]
        tensors += [t for cache in factors.cache.values() for t in cache.values() if t is not None]
    return sum(t.numel() * t.element_size() for t in tensors)


def test_the_statistics_memory_is_announced_before_it_is_used(caplog):
    model, data = _llama(2), token_batches(96)
    # q, k, v, o and down hold their square and eigenvectors; the widening gate and up
    # (32 -> 64) their input's square, the Cholesky factor of W^T W, a float32 copy of W
    # and 33 eigenvectors
    block = (
        sum(2 * 8 * w * w for w in [32, 16, 16, 32, 32]) + 2 * (2 * 8 * 32**2 + 4 * 64 * 32 + 8 * 64 * 33)
    ) / 2**20  # fmt: skip
    wrapped = ps.pca_wrap(model, include="model.layers.*")
    with caplog.at_level("INFO", logger="pcasurgery"):
        ps.calibrate(wrapped, data, progress=False)
        ps.calibrate_sequential(model, data, blocks="model.layers.*")
    # what the layers hold, with their eigenvalues and then their eigenvectors, fits in it
    layers = list(ps.pca_layers_of(wrapped).values())
    held = [_held_bytes(layer) for layer in layers]
    ps.layers.decompose.compute_eigenvectors(layers)
    held = [max(a, _held_bytes(layer)) for a, layer in zip(held, layers, strict=True)]
    assert 0.5 * 2 * block * 2**20 < sum(held) <= 2 * block * 2**20
    gate = ps.pca_layers_of(wrapped)["model.layers.0.mlp.gate_proj"]
    assert held[layers.index(gate)] <= 2 * 8 * 32**2 + 4 * 64 * 32 + 8 * 64 * 33 < 2 * 8 * 64**2
    assert (
        f"calibrate: 14 PCA layers; their statistics and eigenvectors take up to {2 * block:.1f} MiB"
        in caplog.text
    )
    assert (
        f"calibrate_sequential: 2 blocks; the PCA statistics of one block take {block:.1f} MiB"
        in caplog.text
    )


def test_blocks_offloaded_by_accelerate_are_refused_with_the_way_that_works(tmp_path):
    from accelerate import dispatch_model

    model, data = _llama(2), token_batches(96)
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "disk", "model.layers.1": "cpu"}
    device_map.update({"model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dispatched = dispatch_model(model, device_map=device_map, offload_dir=str(tmp_path))
    with pytest.raises(ValueError, match="'model.layers.0' is offloaded by accelerate.*weights="):
        ps.calibrate_sequential(dispatched, data, blocks="model.layers.*")
    with pytest.raises(ValueError, match="'model.layers.0' is offloaded by accelerate"):
        ps.compress_sequential(dispatched, data, blocks="model.layers.*", remove=0.2)


def test_a_finished_block_is_freed_at_once_not_by_the_cycle_collector():
    """Reference counting alone frees a wrapped block once compressed: nothing it holds
    (the fx trace of the wrap and of the fold) keeps it in a reference cycle, which would
    hold a block's statistics until Python's collector ran."""
    model, data = _llama(1), token_batches(96)
    gc.collect()
    gc.disable()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wrapped = ps.pca_wrap(model, include="model.layers.*")
        ps.calibrate(wrapped, data, progress=False)
        ps.apply_plan(wrapped, ps.budget_plan(wrapped, remove=0.2))
        small = ps.compress(wrapped)
        freed = [weakref.ref(wrapped), *map(weakref.ref, ps.pca_layers_of(wrapped).values())]
        del wrapped, model
        assert [ref() for ref in freed] == [None] * len(freed)
        assert small is not None
    finally:
        gc.enable()


def _batch_logits(model, batch):
    return model(**batch, use_cache=False).logits


def test_a_model_on_meta_is_evaluated_from_its_shards_one_block_at_a_time(tmp_path):
    model, data = _llama(), token_batches(96)  # padded batches: the mask reaches every block
    model.save_pretrained(tmp_path / "dense", max_shard_size="20KB")
    empty = _on_meta()
    blocks = list(empty.model.layers)
    resident = []
    for block in blocks:
        block.register_forward_pre_hook(lambda *_: resident.append(_loaded_blocks(empty)))
    with torch.inference_mode():  # what is loaded stays usable by autograd afterwards
        logits = ps.forward_sequential(
            empty, data, blocks="model.layers.*", weights=tmp_path / "dense", forward=_batch_logits
        )
    assert not empty.model.embed_tokens.weight.is_inference()
    assert max(resident) == 1 and resident.count(1) == 3 * len(data)  # each block, each batch
    assert list(empty.model.layers) == blocks and _loaded_blocks(empty) == 0  # as it was
    for got, batch in zip(logits, data, strict=True):
        torch.testing.assert_close(got, _batch_logits(model, batch))


class _TupleBlock(torch.nn.Module):
    """A block that returns ``(hidden, attention)``, as older transformers blocks do."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(8, 8)

    def forward(self, x, scale=1.0):
        return torch.tanh(self.linear(x)) * scale + x, None


class _Stack(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Linear(4, 8)
        self.blocks = torch.nn.ModuleList(_TupleBlock() for _ in range(3))
        self.head = torch.nn.Linear(8, 2)

    def forward(self, x):
        h = self.embed(x)
        for block in self.blocks:
            h = block(h, scale=0.5)[0]
        return self.head(h)


def test_blocks_returning_tuples_and_their_keyword_arguments_are_replayed():
    torch.manual_seed(0)
    model, data = _Stack().eval(), [torch.randn(5, 4) for _ in range(3)]
    got = ps.forward_sequential(model, data, blocks="blocks.*")
    with torch.no_grad():
        for y, x in zip(got, data, strict=True):
            torch.testing.assert_close(y, model(x))
    with pytest.raises(ValueError, match="more batches than the first"):
        ps.forward_sequential(model, _Growing(data), blocks="blocks.*")
    assert all(isinstance(b, _TupleBlock) for b in model.blocks)  # put back after a failure


class _Growing:
    """Batches that are one more the second time they are iterated."""

    def __init__(self, data):
        self.data, self.rounds = data, 0

    def __iter__(self):
        self.rounds += 1
        return iter(self.data + self.data[:1] * (self.rounds > 1))


def _lm_loss(model, batch):
    return model(**batch, labels=batch["input_ids"], use_cache=False).loss


def test_a_loss_weighed_global_budget_measured_block_by_block_equals_the_whole_models(tmp_path):
    model, data = _llama(), token_batches(96)
    planning = token_batches(96, count=2, batch=3, length=20)
    whole = ps.pca_wrap(copy.deepcopy(model), include="model.layers.*")
    ps.calibrate(whole, data, progress=False)
    reference = ps.budget_plan(whole, remove=0.3, loss=_lm_loss, data=planning)
    spectral = ps.budget_plan(whole, remove=0.3)
    assert not reference["k"].equals(spectral["k"])  # the loss moves the allocation
    model.save_pretrained(tmp_path / "dense", max_shard_size="20KB")
    for source, weights in ((copy.deepcopy(model), None), (_on_meta(), tmp_path / "dense")):
        spectra = ps.calibrate_sequential(
            source, data, blocks="model.layers.*", weights=weights,
            loss=_lm_loss, loss_data=planning,
        )  # fmt: skip
        plan = ps.budget_plan(spectra, remove=0.3)
        assert plan.attrs["objective"] == "gradient"
        pd.testing.assert_frame_equal(plan, reference, rtol=1e-9)  # the MACs per example too
    # in one call: compress_sequential's global budget, weighed
    ours = ps.compress_sequential(
        copy.deepcopy(model), data, blocks="model.layers.*", remove=0.3,
        loss=_lm_loss, loss_data=planning, propagate="original",
    )  # fmt: skip
    assert list(ours.compression_report["k"]) == list(reference["k"])
    with pytest.raises(ValueError, match="budget_plan takes no loss for them"):
        ps.budget_plan(spectra, remove=0.3, loss=_lm_loss, data=planning)
    with pytest.raises(ValueError, match="loss and loss_data go together"):
        ps.calibrate_sequential(model, data, blocks="model.layers.*", loss=_lm_loss)
    # a plan made elsewhere: the loss weighs each layer's directions, the ranks are the plan's
    weighed = ps.compress_sequential(
        copy.deepcopy(model), data, blocks="model.layers.*", plan=reference, loss=_lm_loss,
        loss_data=planning,
    )  # fmt: skip
    assert list(weighed.compression_report["k"]) == list(reference["k"])
    assert ps.count_params(weighed) == ps.count_params(ours)


def test_the_compression_pass_decomposes_each_layer_once(monkeypatch):
    """With the plan known, each block's layers get their eigenvalues and eigenvectors
    from one decomposition (no separate eigenvalue pass before the eigenvectors)."""
    from pcasurgery.core import spectrum

    model, data = _llama(2), token_batches(96)
    spectra = ps.calibrate_sequential(model, data, blocks="model.layers.*")
    plan = ps.budget_plan(spectra, remove=0.2)
    calls = []
    eigh, eigvalsh = spectrum.eigh_descending, spectrum.eigvalsh_descending
    monkeypatch.setattr(spectrum, "eigh_descending", lambda m: calls.append("eigh") or eigh(m))
    monkeypatch.setattr(
        spectrum, "eigvalsh_descending", lambda m: calls.append("eigvalsh") or eigvalsh(m)
    )
    small = ps.compress_sequential(copy.deepcopy(model), data, blocks="model.layers.*", plan=plan)
    assert calls == ["eigh"] * len(plan)
    planned = dict(zip(plan["layer"], plan["k"], strict=True))
    report = small.compression_report
    assert dict(zip(report["layer"], report["k"], strict=True)) == planned


def test_the_compression_pass_builds_each_projection_at_its_planned_rank_only(monkeypatch):
    """No projection is built at a default threshold before the plan's ranks are set (a
    wide layer's would be a width x width square while the eigenvectors are computed)."""
    from pcasurgery.core import spectrum

    model, data = _llama(2), token_batches(96)
    plan = ps.budget_plan(ps.calibrate_sequential(model, data, blocks="model.layers.*"), remove=0.3)
    built = []
    affine = spectrum.projection_affine

    def recording(basis, *args, **kwargs):
        built.append(basis.shape[1])
        return affine(basis, *args, **kwargs)

    monkeypatch.setattr(spectrum, "projection_affine", recording)
    ps.compress_sequential(copy.deepcopy(model), data, blocks="model.layers.*", plan=plan)
    planned = sorted(int(k) for k in plan["k"])
    assert sorted(k for k in built if k > 1) == [k for k in planned if k > 1]


class _Residual(torch.nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.fc = torch.nn.Linear(width, width)
        self.out = torch.nn.Linear(width, width)

    def forward(self, x):
        return x + self.out(torch.tanh(self.fc(x)))


class _Residuals(torch.nn.Module):
    def __init__(self, width: int = 6, blocks: int = 2):
        super().__init__()
        self.blocks = torch.nn.ModuleList(_Residual(width) for _ in range(blocks))
        self.head = torch.nn.Linear(width, 3)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _first_output_loss(model, batch):
    return (model(batch)[:, 0] - 1).square().mean()


def _weighed_projection(inputs, module, grads, k):
    """numpy: the map ``y -> mu + S^-1 U U^T S (y - mu)`` after ``module`` (``S``: the features'
    weights ``sqrt(g / mean(g) + 0.1)``; ``U``: the top ``k`` eigenvectors of ``S C S``), as
    one affine map ``(P W, P b + (I - P) mu)``."""
    import numpy as np

    w, b = module.weight.detach().numpy(), module.bias.detach().numpy()
    y = inputs @ w.T + b
    mu = y.mean(0)
    cov = (y - mu).T @ (y - mu) / len(y)
    g = (grads**2).sum(0)
    s = np.sqrt(g / g.mean() + 0.1)
    _, vectors = np.linalg.eigh(s[:, None] * cov * s[None, :])
    u = vectors[:, ::-1][:, :k]
    p = (u @ u.T) * (1 / s)[:, None] * s[None, :]
    return p @ w, p @ b + mu - p @ mu


def test_a_loss_weighs_each_layers_directions_by_its_gradient_there():
    """numpy reference: each layer projects in the metric of the loss's squared gradient at
    its outputs (measured on the dense model), at the plan's rank; the next block is
    calibrated on the compressed block's outputs, and the user's blocks are not changed."""
    import numpy as np

    torch.manual_seed(0)
    model = _Residuals().double()
    data = [torch.randn(32, 6, dtype=torch.float64) for _ in range(3)]
    planning = [torch.randn(16, 6, dtype=torch.float64) for _ in range(2)]
    dense = copy.deepcopy(model)
    first = model.blocks[0]
    plan = ps.budget_plan(
        ps.calibrate_sequential(model, data, blocks="blocks.*", progress=False), remove=0.5
    )
    ks = dict(zip(plan["layer"], plan["k"], strict=True))
    names = [f"blocks.{i}.{m}" for i in range(2) for m in ("fc", "out")]
    assert all(0 < ks[name] < 6 for name in names)

    grads: dict[str, list] = {name: [] for name in names}  # the loss's gradient there, dense

    def keep(name, module, args, out):
        out.register_hook(lambda g: grads[name].append(g.numpy()))

    handles = [
        dense.get_submodule(name).register_forward_hook(functools.partial(keep, name))
        for name in names
    ]
    for batch in planning:
        _first_output_loss(dense, batch).backward()
    for handle in handles:
        handle.remove()

    small = ps.compress_sequential(
        model, data, blocks="blocks.*", plan=plan, loss=_first_output_loss,
        loss_data=planning, progress=False,
    )  # fmt: skip
    x = torch.cat(data)
    with torch.no_grad():
        for i in range(2):
            # within a block, each layer is calibrated on the dense block's activations
            inputs = {"fc": x, "out": torch.tanh(dense.blocks[i].fc(x))}
            for m in ("fc", "out"):
                name, g = f"blocks.{i}.{m}", np.concatenate(grads[f"blocks.{i}.{m}"])
                module, k = dense.get_submodule(name), ks[name]
                want_w, want_b = _weighed_projection(inputs[m].numpy(), module, g, k)
                got = small.get_submodule(name)
                np.testing.assert_allclose(got.weight.numpy(), want_w, atol=1e-10)
                np.testing.assert_allclose(got.bias.numpy(), want_b, atol=1e-10)
                plain, _ = _weighed_projection(inputs[m].numpy(), module, np.ones_like(g), k)
                assert np.abs(plain - want_w).max() > 1e-3  # the weights moved the directions
            x = small.blocks[i](x)  # the next block's inputs: the compressed block's outputs
    torch.testing.assert_close(first.fc.weight, dense.blocks[0].fc.weight, rtol=0, atol=0)


def test_the_loss_activations_are_released_before_the_blocks_are_compressed(monkeypatch):
    """Each block's inputs and output gradients on the loss's batches serve the first pass's
    measures; the compression pass holds the first block's only (its feature weights)."""
    from pcasurgery.analysis import sequential

    made, held = [], []
    init, compress_block = sequential._Weighing.__init__, sequential._compress_block

    def keep(self, *args, **kwargs):
        init(self, *args, **kwargs)
        made.append(self)

    def count(*args, **kwargs):
        held.append([len(calls) for calls in made[0].inputs + made[0].grads])
        return compress_block(*args, **kwargs)

    monkeypatch.setattr(sequential._Weighing, "__init__", keep)
    monkeypatch.setattr(sequential, "_compress_block", count)
    model, data = _llama(), token_batches(96)
    planning = token_batches(96, count=2, batch=3, length=20)
    ps.compress_sequential(
        model, data, blocks="model.layers.*", remove=0.3, loss=_lm_loss, loss_data=planning
    )
    assert held == [[2, 0, 0, 2, 0, 0]] * 3


def test_a_scratch_folder_spares_the_second_pass_its_forwards_and_decompositions(
    monkeypatch, tmp_path, caplog
):
    """With the dense activations passed on, the global budget's second pass would calibrate
    each block on what the first saw: with ``scratch`` the first pass writes the eigenspaces
    there and the second reads them, so that each block runs and is decomposed once, and the
    result is still the whole model's."""
    from pcasurgery.core import spectrum

    model, data = _llama(), token_batches(96)
    plan, whole = _whole_model(model, data, remove=0.3)
    layer_class = type(model.model.layers[0])
    calls = []
    forward = layer_class.forward
    eigh, eigvalsh = spectrum.eigh_descending, spectrum.eigvalsh_descending

    def counted(self, hidden, *args, **kwargs):
        if isinstance(hidden, torch.Tensor):  # a run, not torch.fx tracing the block
            calls.append("block")
        return forward(self, hidden, *args, **kwargs)

    monkeypatch.setattr(layer_class, "forward", counted)
    monkeypatch.setattr(spectrum, "eigh_descending", lambda m: calls.append("eigh") or eigh(m))
    monkeypatch.setattr(
        spectrum, "eigvalsh_descending", lambda m: calls.append("eigvalsh") or eigvalsh(m)
    )
    with caplog.at_level("INFO", logger="pcasurgery"):
        sequential = ps.compress_sequential(
            copy.deepcopy(model),
            data,
            blocks="model.layers.*",
            remove=0.3,
            propagate="original",
            scratch=tmp_path / "scratch",
        )
    assert calls.count("block") == 3 * len(data)  # the first pass only
    assert calls.count("eigh") == len(plan) and "eigvalsh" not in calls
    assert "eigenspaces take" in caplog.text
    assert not any((tmp_path / "scratch").iterdir())  # its own folder is removed
    assert list(sequential.compression_report["k"]) == list(plan["k"])
    assert ps.count_params(sequential) == ps.count_params(whole)
    torch.testing.assert_close(
        _logits(sequential, PROMPT), _logits(whole, PROMPT), atol=1e-5, rtol=1e-5
    )
    # a model on meta, read from its shards in both passes
    model.save_pretrained(tmp_path / "dense", max_shard_size="20KB")
    from_disk = ps.compress_sequential(
        _on_meta(), data, blocks="model.layers.*", remove=0.3, propagate="original",
        weights=tmp_path / "dense", scratch=tmp_path / "scratch",
    )  # fmt: skip
    torch.testing.assert_close(_logits(from_disk, PROMPT), _logits(sequential, PROMPT))
    with pytest.raises(ValueError, match="scratch keeps .* propagate='compressed'"):
        ps.compress_sequential(model, data, blocks="model.layers.*", remove=0.3, scratch=tmp_path)
    (tmp_path / "a file").write_text("")
    with pytest.raises(ValueError, match="scratch=.* is a file"):
        ps.compress_sequential(
            model,
            data,
            blocks="model.layers.*",
            remove=0.3,
            propagate="original",
            scratch=tmp_path / "a file",
        )
