"""Models from the ``transformers`` library (tiny random configs, no download).

A causal LM of the Llama family, GPT-2 (``Conv1D`` projections, tied output
layer) and a BERT encoder: wrap the blocks, calibrate on padded tokenizer-style
batches, keep the model's class and methods (``generate``), compress to the
projecting model's outputs, export the encoder with dynamic batch and sequence.
"""

from __future__ import annotations

import copy
import warnings

import pandas as pd
import pytest
import torch
from models import token_batches

import pcasurgery as ps

transformers = pytest.importorskip("transformers")


def llama():
    config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=True,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config), "model.layers.*"


def gpt2():
    config = transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return transformers.GPT2LMHeadModel(config), "transformer.h.*"


@pytest.mark.parametrize("build", [llama, gpt2], ids=["llama", "gpt2"])
def test_a_causal_lm_keeps_its_class_and_generate(build):
    torch.manual_seed(0)
    model, blocks = build()
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tied output layer is left alone, with a warning
        wrapped = ps.pca_wrap(model, 0.9, include=blocks)
    assert type(wrapped) is type(model)
    layers = ps.pca_layers_of(wrapped)
    assert len(layers) == (14 if build is llama else 8)
    ps.calibrate(wrapped, token_batches(96), progress=False)
    assert all(layer.samples == 16 for layer in layers.values())
    assert all(int(layer.sample_count) == 16 * 24 - 4 * 12 for layer in layers.values())  # no pads
    prompt = torch.randint(3, 96, (2, 5))
    with torch.no_grad():
        projected = wrapped(input_ids=prompt).logits
        generated = wrapped.generate(prompt, max_new_tokens=4, do_sample=False)
    assert generated.shape == (2, 9)
    small = ps.compress(wrapped)  # the model's class, with a save_pretrained that ships it
    assert (
        isinstance(small, type(model))
        and type(small).__name__ == "Compressed" + type(model).__name__
    )
    with torch.no_grad():
        torch.testing.assert_close(small(input_ids=prompt).logits, projected, atol=1e-4, rtol=1e-4)
        assert torch.equal(small.generate(prompt, max_new_tokens=4, do_sample=False), generated)
    assert ps.count_params(small) < ps.count_params(model)


@pytest.mark.parametrize("state", ["threshold 0.9", "threshold 1.0", "after apply_plan"])
def test_a_calibrated_model_saves_with_save_pretrained_and_loads_back(state, tmp_path):
    # safetensors refuses tensors that share memory: no PCA buffer aliases another
    safetensors = pytest.importorskip("safetensors.torch")
    torch.manual_seed(0)
    model, blocks = llama()
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = ps.pca_wrap(model, 1.0 if state == "threshold 1.0" else 0.9, include=blocks)
        fresh = ps.pca_wrap(model, 0.5, include=blocks)
    ps.calibrate(wrapped, token_batches(96), progress=False)
    if state == "after apply_plan":
        ps.apply_plan(wrapped, ps.budget_plan(wrapped, remove=0.2))
    prompt = torch.randint(3, 96, (2, 5))
    with torch.no_grad():
        expected = wrapped(input_ids=prompt).logits
    wrapped.save_pretrained(tmp_path)
    state = {}
    for path in sorted(tmp_path.glob("*.safetensors")):
        state.update(safetensors.load_file(path))
    assert any(key.endswith("pca.eigenvectors") for key in state)
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    assert not unexpected and all("lm_head" in key for key in missing)  # tied to the embedding
    fresh.eval()
    assert {n: lay.in_dim for n, lay in ps.pca_layers_of(fresh).items()} == {
        n: lay.in_dim for n, lay in ps.pca_layers_of(wrapped).items()
    }
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=prompt).logits, expected, atol=1e-5, rtol=1e-5)


def test_a_bert_encoder_compresses_and_exports_with_dynamic_batch_and_sequence(tmp_path):
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64,
    )  # fmt: skip
    model = transformers.BertModel(config).eval()
    wrapped = ps.pca_wrap(model, 0.9, include="encoder.layer.*")
    assert type(wrapped) is type(model) and len(ps.pca_layers_of(wrapped)) == 12
    batches = token_batches(96)
    ps.calibrate(wrapped, batches, progress=False)
    small = ps.compress(wrapped)
    example = batches[0]
    with torch.no_grad():
        torch.testing.assert_close(
            small(**example).last_hidden_state,
            wrapped(**example).last_hidden_state,
            atol=1e-4,
            rtol=1e-4,
        )
    ps.export_onnx(small, example, tmp_path / "bert.onnx")  # checked at other shapes too


@pytest.mark.parametrize("build", [llama, gpt2], ids=["llama", "gpt2"])
def test_a_budget_weighed_by_the_language_models_loss(build):
    # padded dict batches, widening MLP layers (fewer eigenvectors than outputs), Conv1D
    torch.manual_seed(0)
    model, blocks = build()
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = ps.pca_wrap(model, include=blocks)
    batches = token_batches(96)
    ps.calibrate(wrapped, batches, progress=False)
    for layer in ps.pca_layers_of(wrapped).values():  # (what the plan uses first)
        layer.compute_eigenvectors()
    state = {k: v.clone() for k, v in wrapped.state_dict().items()}

    def lm_loss(m, batch):
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        return m(**batch, labels=labels).loss

    plan = ps.budget_plan(wrapped, remove=0.2, loss=lm_loss, data=batches)
    assert plan.attrs["objective"] == "gradient" and plan.attrs["removed"] >= 0.2
    assert all(torch.equal(v, state[k]) for k, v in wrapped.state_dict().items())
    assert all(p.requires_grad for p in wrapped.parameters())
    ps.apply_plan(wrapped, plan)
    small = ps.compress(wrapped)
    prompt = torch.randint(3, 96, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(
            small(input_ids=prompt).logits, wrapped(input_ids=prompt).logits, atol=1e-4, rtol=1e-4
        )


@pytest.mark.parametrize("order", ["dispatched then wrapped", "wrapped then dispatched"])
def test_a_llama_dispatched_by_accelerate_with_offloaded_blocks(order, tmp_path):
    """Blocks offloaded to disk (weights on the meta device between calls): calibrated,
    projected (folded or not), planned and compressed as the same model kept in memory,
    and the compressed layers stay offloaded under hooks of their own."""
    accelerate = pytest.importorskip("accelerate")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config).eval()
    twin = ps.pca_wrap(copy.deepcopy(model), 0.9, include="model.layers.*")
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.layers.2": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu",
                  "lm_head": "cpu"}  # fmt: skip

    def dispatch(m):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "some parameters are on the meta device"
            return accelerate.dispatch_model(m, device_map=device_map, main_device="cpu",
                                             offload_dir=str(tmp_path))  # fmt: skip

    if order == "dispatched then wrapped":
        wrapped = ps.pca_wrap(dispatch(model), 0.9, include="model.layers.*")
    else:
        wrapped = dispatch(ps.pca_wrap(model, 0.9, include="model.layers.*"))
    up = wrapped.get_submodule("model.layers.1.mlp.up_proj")
    assert ps.layers.offload.offloaded(getattr(up, "module", up))  # the block is on disk
    data = [torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(i))
            for i in range(4)]  # fmt: skip
    heads = []
    for m in (wrapped, twin):
        heads.append([0])
        m.lm_head.register_forward_hook(lambda *_, runs=heads[-1]: runs.__setitem__(0, runs[0] + 1))
    ps.calibrate(wrapped, data, progress=False)
    ps.calibrate(twin, data, progress=False)
    # accelerate's hooks expect each forward they start to end: the dispatched model's
    # LM head runs on every batch, the twin's on the first only (surgery.tail)
    assert heads == [[4], [1]]
    ids = torch.randint(0, 64, (3, 12))
    with torch.no_grad():
        expected = twin(ids).logits
        torch.testing.assert_close(wrapped(ids).logits, expected, atol=1e-5, rtol=1e-5)
        with ps.folded(wrapped):
            torch.testing.assert_close(wrapped(ids).logits, expected, atol=1e-5, rtol=1e-5)
    plan = ps.budget_plan(wrapped, remove=0.3)
    pd.testing.assert_frame_equal(plan, ps.budget_plan(twin, remove=0.3))
    ps.apply_plan(wrapped, plan)
    ps.apply_plan(twin, plan)
    small = ps.compress(wrapped)
    assert ps.count_params(small) == ps.count_params(ps.compress(twin))
    with torch.no_grad():
        torch.testing.assert_close(small(ids).logits, twin(ids).logits, atol=1e-5, rtol=1e-5)
    q = small.get_submodule("model.layers.2.self_attn.q_proj")
    assert isinstance(q, ps.compression.LowRank) and q._hf_hook.offload
    assert all(p.is_meta for p in q.parameters())  # offloaded again between calls
