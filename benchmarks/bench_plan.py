"""The global budget's planning time on an LLM's spectra: ``budget_plan`` at scale.

One decoder block of the given shape (random float32 weights, seeded) is
wrapped and calibrated on ``--windows`` windows of 512 random hidden states (by
default more samples than the block's widest input, so that no spectrum is cut
short), keeping its layers' eigenvalues only (as ``calibrate_sequential`` keeps
them); copies of
it, their weights on ``meta``, stand for ``--blocks`` blocks under one root, as
``calibrate_sequential`` returns them. ``budget_plan(remove=...)`` is then
timed on them (best of ``--repeats``): it prices every rank of every layer and
allocates the budget over all of them (a 7B-shaped model: 224 layers, 1.36
million candidate ranks).

Shapes: ``llama7b`` (hidden 4096, MLP 11008, 32 blocks, 32 heads) and
``tinyllama`` (hidden 2048, MLP 5632, 22 blocks, 32 / 4 heads).

Usage: python benchmarks/bench_plan.py [--shape llama7b] [--blocks N] [--windows 9] [--remove 0.2]
           [--by params|macs] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from torch import nn

SHAPES = {
    "llama7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=32),
    "tinyllama": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                      num_attention_heads=32, num_key_value_heads=4),
}  # fmt: skip


def spectra(shape: str, blocks: int | None, windows: int) -> nn.Module:
    """``blocks`` copies of one calibrated block's eigenvalues, named as a model's layers."""
    import transformers

    import pcasurgery as ps

    torch.manual_seed(0)
    config = dict(SHAPES[shape])
    count = blocks or config.pop("num_hidden_layers")
    config["num_hidden_layers"] = 1
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=128, **config))
    block = model.model.layers[0].eval()
    wrapped = ps.pca_wrap(block, include="*")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(windows, 1, 512, config["hidden_size"], generator=g)
    position = model.model.rotary_emb(x[0], torch.arange(512)[None])
    ps.calibrate(wrapped, [((h,), {"position_embeddings": position}) for h in x],
                 forward=lambda b, call: b(*call[0], **call[1]), progress=False)  # fmt: skip
    for layer in ps.pca_layers_of(wrapped).values():
        layer.keep_eigenvalues_only()
    for module in wrapped.modules():
        for key, param in list(module._parameters.items()):
            if param is not None:
                module._parameters[key] = nn.Parameter(param.to("meta"), False)
    root = nn.Module()
    root.layers = nn.ModuleList([copy.deepcopy(wrapped) for _ in range(count)])
    return root


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="llama7b", choices=sorted(SHAPES))
    parser.add_argument("--blocks", type=int, default=None)
    parser.add_argument("--windows", type=int, default=9)
    parser.add_argument("--remove", type=float, default=0.2)
    parser.add_argument("--by", default="params", choices=["params", "macs"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import pcasurgery as ps

    start = time.perf_counter()
    root = spectra(args.shape, args.blocks, args.windows)
    built = time.perf_counter() - start
    layers = ps.pca_layers_of(root)
    ranks = sum(layer.width for layer in layers.values())
    seconds = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        plan = ps.budget_plan(root, remove=args.remove, by=args.by, progress=False)
        seconds.append(time.perf_counter() - start)
    print(f"{args.shape}: {len(layers)} layers, {ranks:,} candidate ranks; budget_plan("
          f"remove={args.remove}, by={args.by!r}): {min(seconds):.2f} s (best of "
          f"{args.repeats}; all: {', '.join(f'{s:.2f}' for s in seconds)}); removed "
          f"{plan.attrs['removed']:.3f} (one block calibrated in {built:.0f} s)")  # fmt: skip
    return {"seconds": min(seconds), "layers": len(layers), "ranks": ranks}


if __name__ == "__main__":
    main()
