"""A Llama-7B-shaped model from weights on disk, block by block, on this machine (opt-in).

Writes a random Llama-7B-shaped checkpoint (32 blocks, hidden 4096, MLP 11008,
32 heads, vocabulary 32000; bfloat16 weights of standard deviation 0.02, seeded)
as transformers' sharded safetensors to a temporary folder (about 13.5 GB), then
runs, each step in a fresh process that reports its seconds and peak resident
memory:

1. report: the model built on ``meta`` (``accelerate.init_empty_weights``),
   ``calibrate_sequential(weights=...)`` on ``--windows`` windows of 512 random
   tokens, ``report`` (goal: <= 20 min at a peak <= 8 GiB);
2. compress: the same, then ``budget_plan(remove=0.2)`` on those spectra (its
   seconds printed apart) and
   ``compress_sequential(plan=..., weights=..., out=..., out_dtype=bfloat16)``,
   each compressed block written as it is done (goal: <= 60 min end to end);
   with ``--loss``, the plan weighed by the language-model loss on 2 other
   windows (``calibrate_sequential(loss=..., loss_data=...)``);
3. load: ``AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True,
   dtype=bfloat16)``, its parameter count against the report's, and one forward
   of a window (finite logits).

The folder is removed at the end (``--keep`` keeps it).

Usage: python benchmarks/bench_llama7b.py [--blocks 32] [--windows 2] [--threads 2]
           [--folder DIR] [--keep] [--loss] [--steps report compress load]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

_COMMON = textwrap.dedent(
    """
    import json, os, resource, sys, time, warnings
    import torch, transformers
    warnings.simplefilter("ignore")
    folder, blocks, windows, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    torch.set_num_threads(threads)
    config = transformers.LlamaConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=blocks,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=2048,
    )
    def peak():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    def windows_of(n, seed=1):
        g = torch.Generator().manual_seed(seed)
        return [{"input_ids": torch.randint(0, 32000, (1, 512), generator=g)} for _ in range(n)]
    """
)

_WRITE = _COMMON + textwrap.dedent(
    """
    from safetensors.torch import save_file
    from accelerate import init_empty_weights
    with init_empty_weights():
        model = transformers.LlamaForCausalLM(config)
    start = time.perf_counter()
    g = torch.Generator().manual_seed(0)
    groups = {}
    for name, p in model.named_parameters():
        group = ".".join(name.split(".")[:3]) if name.startswith("model.layers.") else "others"
        groups.setdefault(group, []).append((name, p.shape))
    weight_map, total = {}, 0
    for i, (group, params) in enumerate(groups.items()):
        tensors = {}
        for name, shape in params:
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
            else:
                tensors[name] = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
            total += tensors[name].numel() * 2
        file = f"model-{i:05d}.safetensors"
        save_file(tensors, os.path.join(folder, file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    config.save_pretrained(folder)
    print(json.dumps({"seconds": time.perf_counter() - start, "peak": peak(), "bytes": total}))
    """
)

_REPORT = _COMMON + textwrap.dedent(
    """
    import pcasurgery as ps
    from accelerate import init_empty_weights
    with init_empty_weights():
        model = transformers.LlamaForCausalLM(config).eval()
    start = time.perf_counter()
    mode = sys.argv[5]
    weighed = {}
    if mode == "compress-loss":  # the plan weighed by the loss, on 2 other windows
        weighed = dict(loss=lambda m, b: m(**b, labels=b["input_ids"], use_cache=False).loss,
                       loss_data=windows_of(2, seed=2))
    spectra = ps.calibrate_sequential(model, windows_of(windows), blocks="model.layers.*",
                                      weights=folder, **weighed)
    report = ps.report(spectra)
    seconds = time.perf_counter() - start
    result = {"seconds": seconds, "layers": len(report),
              "saturation": float(report["saturation"].mean())}
    if mode.startswith("compress"):
        planning = time.perf_counter()
        plan = ps.budget_plan(spectra, remove=0.2)
        result["plan_seconds"] = time.perf_counter() - planning
        small = ps.compress_sequential(model, windows_of(windows), blocks="model.layers.*",
                                       plan=plan, weights=folder, out=folder + "-small",
                                       out_dtype=torch.bfloat16)
        r = small.compression_report
        result.update(compress_seconds=time.perf_counter() - start - seconds,
                      params_before=int(r["params_before"].sum()),
                      params_after=int(r["params_after"].sum()))
    result["peak"] = peak()
    print(json.dumps(result))
    """
)

_LOAD = _COMMON + textwrap.dedent(
    """
    start = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder + "-small", trust_remote_code=True, dtype=torch.bfloat16).eval()
    loaded = time.perf_counter() - start
    with torch.no_grad():
        logits = model(**windows_of(1)[0]).logits
    print(json.dumps({"seconds": loaded, "forward": time.perf_counter() - start - loaded,
                      "class": type(model).__name__, "finite": bool(torch.isfinite(logits).all()),
                      "params": sum(p.numel() for p in model.parameters()), "peak": peak()}))
    """
)


def _run(code: str, *args: str) -> dict:
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    if run.returncode:
        raise SystemExit(
            f"failed (exit {run.returncode}; -9: killed for memory)\n{run.stderr[-3000:]}"
        )
    result = json.loads(run.stdout.strip().splitlines()[-1])
    result["wall"] = time.perf_counter() - start
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=32)
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--folder", help="where to write the checkpoint (default: a temporary folder)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints")
    parser.add_argument(
        "--loss", action="store_true",
        help="compress with the plan weighed by the loss (calibrate_sequential(loss=...))",
    )  # fmt: skip
    parser.add_argument(
        "--steps", nargs="+", default=["report", "compress", "load"],
        choices=["report", "compress", "load"], help="the steps after writing (default: all)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    folder = args.folder or tempfile.mkdtemp(prefix="llama7b-")
    Path(folder).mkdir(parents=True, exist_ok=True)
    common = [folder, str(args.blocks), str(args.windows), str(args.threads)]
    gib = 2**30
    results = {}
    try:
        w = results["write"] = _run(_WRITE, *common)
        print(
            f"write: {w['bytes'] / 1e9:.1f} GB of bfloat16 shards in {w['seconds']:.0f} s",
            flush=True,
        )
        if "report" in args.steps:
            r = results["report"] = _run(_REPORT, *common, "report")
            print(f"report: {r['seconds']:.0f} s ({r['seconds'] / 60:.1f} min, goal <= 20), peak "
                  f"{r['peak'] / gib:.2f} GiB (goal <= 8); {r['layers']} layers, mean saturation "
                  f"{r['saturation']:.3f}", flush=True)  # fmt: skip
        if "compress" in args.steps:
            mode = "compress-loss" if args.loss else "compress"
            c = results["compress"] = _run(_REPORT, *common, mode)
            removed = 1 - c["params_after"] / c["params_before"]
            what = "spectra and the loss's gradients" if args.loss else "spectra"
            print(f"compress: {what} {c['seconds']:.0f} s + compression "
                  f"{c['compress_seconds']:.0f} s (the plan {c['plan_seconds']:.1f} s of it) = "
                  f"{(c['seconds'] + c['compress_seconds']) / 60:.1f} "
                  f"min (goal <= 60), peak {c['peak'] / gib:.2f} GiB; block parameters "
                  f"{c['params_before']:,} -> {c['params_after']:,} ({removed:.1%} fewer)",
                  flush=True)  # fmt: skip
        if "load" in args.steps:
            ld = results["load"] = _run(_LOAD, *common)
            print(f"load: {ld['class']} in {ld['seconds']:.0f} s, {ld['params']:,} parameters, "
                  f"forward of 512 tokens {ld['forward']:.0f} s, logits finite: {ld['finite']}, "
                  f"peak {ld['peak'] / gib:.2f} GiB", flush=True)  # fmt: skip
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
            shutil.rmtree(folder + "-small", ignore_errors=True)
    return results


if __name__ == "__main__":
    main()
