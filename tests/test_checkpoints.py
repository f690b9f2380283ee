"""Compressed transformers models ship as checkpoints that load without pcasurgery.

``small.save_pretrained(folder)`` writes safetensors, a config recording every
replaced module, and the self-contained modeling file; a Python process in
which ``import pcasurgery`` fails loads the folder with ``AutoModel*`` and
``trust_remote_code=True``, without allocating the dense model, to the same
outputs, parameter count and greedy generations. Five architectures: Llama
and Qwen2 (grouped-query attention), GPT-2 (``Conv1D`` projections), BERT (an
encoder, loaded with ``AutoModel``) and T5 (encoder-decoder).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from models import decoder_config, token_batches

import pcasurgery as ps

transformers = pytest.importorskip("transformers")

VOCAB = 96


def _llama():
    config = transformers.LlamaConfig(**decoder_config(vocab_size=VOCAB, tie_word_embeddings=True))
    return transformers.LlamaForCausalLM(config), "model.layers.*", "AutoModelForCausalLM"


def _qwen2():
    config = transformers.Qwen2Config(**decoder_config(vocab_size=VOCAB))
    return transformers.Qwen2ForCausalLM(config), "model.layers.*", "AutoModelForCausalLM"


def _gpt2():
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64
    )
    return transformers.GPT2LMHeadModel(config), "transformer.h.*", "AutoModelForCausalLM"


def _bert():
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    return transformers.BertModel(config), "encoder.layer.*", "AutoModel"


def _t5():
    config = transformers.T5Config(
        vocab_size=VOCAB,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        decoder_start_token_id=0,
    )
    return transformers.T5ForConditionalGeneration(config), "*.block.*", "AutoModelForSeq2SeqLM"


ARCHITECTURES = {"llama": _llama, "qwen2": _qwen2, "gpt2": _gpt2, "bert": _bert, "t5": _t5}

# Runs where pcasurgery cannot be imported: loads each folder, writes its outputs.
_LOADER = textwrap.dedent(
    """
    import json, sys
    sys.modules["pcasurgery"] = None  # `import pcasurgery` raises ImportError
    import torch, transformers
    from torch.nn.modules.module import register_module_parameter_registration_hook

    allocated = {}  # every parameter registered off the meta device while loading

    def registered(module, name, param):
        if param is not None and param.device.type != "meta":
            allocated[id(param)] = param.numel()

    register_module_parameter_registration_hook(registered)
    for job in json.loads(sys.argv[1]):
        allocated.clear()
        auto = getattr(transformers, job["auto"])
        model = auto.from_pretrained(job["folder"], trust_remote_code=True).eval()
        inputs = torch.load(job["inputs"], weights_only=True)
        with torch.no_grad():
            out = model(**inputs)
            result = {"output": out[0]}
            if hasattr(model, "generate") and model.can_generate():
                result["generated"] = model.generate(
                    inputs["input_ids"], max_new_tokens=4, do_sample=False
                )
        result["params"] = torch.tensor(sum(p.numel() for p in model.parameters()))
        result["allocated"] = torch.tensor(sum(allocated.values()))
        result["class"] = torch.tensor(list(type(model).__name__.encode()))
        torch.save(result, job["result"])
    """
)


def _inputs(name: str) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(5))
    if name == "t5":
        return {"input_ids": ids, "decoder_input_ids": ids[:, :4]}
    return {"input_ids": ids}


def _calibration(name: str) -> list[dict[str, torch.Tensor]]:
    batches = token_batches(VOCAB)
    if name == "t5":
        batches = [{**b, "decoder_input_ids": b["input_ids"][:, :8]} for b in batches]
    return batches


def test_compressed_models_load_where_pcasurgery_is_not_installed(tmp_path):
    jobs, expected = [], {}
    for name, build in ARCHITECTURES.items():
        torch.manual_seed(0)
        model, blocks, auto = build()
        model.eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tied output layers are left alone, with a warning
            wrapped = ps.pca_wrap(model, 0.8, include=blocks)
        ps.calibrate(wrapped, _calibration(name), progress=False)
        small = ps.compress(wrapped)
        assert set(small.compression_report["action"]) & {"factorised", "down-projection"}, name
        folder = tmp_path / name
        small.save_pretrained(folder)
        config = json.loads((folder / "config.json").read_text())
        assert auto in config["auto_map"], name
        assert set(config["pcasurgery"]["modules"]) == set(small.compression_report["layer"])
        inputs = _inputs(name)
        torch.save(inputs, tmp_path / f"{name}-inputs.pt")
        with torch.no_grad():
            out = small(**inputs)
            expected[name] = {
                "output": out[0],
                "params": ps.count_params(small),
                "dense": ps.count_params(model),
            }
            if small.can_generate():
                expected[name]["generated"] = small.generate(
                    inputs["input_ids"], max_new_tokens=4, do_sample=False
                )
        jobs.append(
            {
                "auto": auto,
                "folder": str(folder),
                "inputs": str(tmp_path / f"{name}-inputs.pt"),
                "result": str(tmp_path / f"{name}-result.pt"),
            }
        )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    run = subprocess.run(
        [sys.executable, "-c", _LOADER, json.dumps(jobs)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    for name, want in expected.items():
        got = torch.load(tmp_path / f"{name}-result.pt", weights_only=True)
        assert bytes(got["class"].tolist()).decode().startswith("Compressed"), name
        torch.testing.assert_close(got["output"], want["output"], atol=1e-5, rtol=1e-5, msg=name)
        assert int(got["params"]) == want["params"] < want["dense"], name
        assert int(got["allocated"]) <= want["params"], name  # the dense model is never built
        if "generated" in want:
            assert torch.equal(got["generated"], want["generated"]), name
