"""Whole-model against block-by-block compression: peak memory and time, in one run.

A TinyLlama-1.1B-shaped decoder (hidden 2048, MLP 5632, 32 query / 4 key-value
heads, vocabulary 32000, ``--blocks`` decoder blocks, default 22; random float32
weights, seeded) and ``--windows`` windows of 512 random tokens. Each mode runs
in a fresh process, which reports its peak resident memory:

* whole: ``pca_wrap`` the blocks, ``calibrate(eigenvectors=True)`` (one decomposition
  a layer, as the model is compressed next), ``budget_plan(remove=0.2)``,
  ``apply_plan``, ``compress``;
* sequential: ``compress_sequential(..., remove=0.2, budget=--budget,
  propagate=--propagate)`` (one block's statistics at a time; by default the
  compressed activations passed on; the global budget makes a first pass for the
  eigenvalues). ``--scratch`` (with ``--propagate original``): the first pass
  writes each block's eigenspaces to a temporary folder and the second reads
  them, instead of calibrating every block again on the same activations.

Printed: the weights' size, each mode's seconds and peak memory above the
weights, and the ratios (goal: sequential peak <= weights + 1.5 GiB, time
within 1.2x of the whole-model run).

Usage: python benchmarks/bench_sequential.py [--blocks 22] [--windows 8] [--threads 2]
           [--budget global|per-block] [--propagate compressed|original] [--scratch]
           [--modes sequential whole]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap

_RUN = textwrap.dedent(
    """
    import json, resource, sys, tempfile, time, warnings
    import torch, transformers
    import pcasurgery as ps

    mode, blocks, windows, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=blocks,
        num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    g = torch.Generator().manual_seed(1)
    data = [{"input_ids": torch.randint(0, 32000, (1, 512), generator=g)} for _ in range(windows)]
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if mode == "whole":
            wrapped = ps.pca_wrap(model, include="model.layers.*")
            del model
            ps.calibrate(wrapped, data, progress=False, eigenvectors=True)  # compressed next
            ps.apply_plan(wrapped, ps.budget_plan(wrapped, remove=0.2))
            small = ps.compress(wrapped)
        else:
            with tempfile.TemporaryDirectory() as scratch:
                small = ps.compress_sequential(
                    model, data, blocks="model.layers.*", remove=0.2, budget=sys.argv[5],
                    propagate=sys.argv[6], scratch=scratch if sys.argv[7] == "1" else None,
                )
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"seconds": seconds, "peak": peak, "weights": weights, "built": base,
                      "params": ps.count_params(small)}))
    """
)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=22)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--budget", default="global", choices=["global", "per-block"],
                        help="compress_sequential's budget (global: two passes)")  # fmt: skip
    parser.add_argument("--propagate", default="compressed", choices=["compressed", "original"])
    parser.add_argument("--scratch", action="store_true",
                        help="the first pass's eigenspaces kept on disk for the second "
                             "(needs --propagate original and the global budget)")  # fmt: skip
    parser.add_argument("--modes", nargs="+", default=["sequential", "whole"],
                        choices=["sequential", "whole"])  # fmt: skip
    args = parser.parse_args(argv)
    results = {}
    for mode in args.modes:
        run = subprocess.run(
            [
                sys.executable,
                "-c",
                _RUN,
                mode,
                str(args.blocks),
                str(args.windows),
                str(args.threads),
                args.budget,
                args.propagate,
                "1" if args.scratch else "0",
            ],
            capture_output=True,
            text=True,
        )
        if run.returncode:
            print(
                f"{mode}: failed (exit {run.returncode}; killed for memory if -9)\n{run.stderr[-2000:]}"
            )
            continue
        results[mode] = json.loads(run.stdout.strip().splitlines()[-1])
        r = results[mode]
        label = (
            mode
            if mode == "whole"
            else (
                f"sequential ({args.budget} budget, {args.propagate} activations passed on"
                f"{', scratch' if args.scratch else ''})"
            )
        )
        print(f"{label}: {r['seconds']:7.1f} s, peak {r['peak'] / 2**30:6.2f} GiB "
              f"({(r['peak'] - r['weights']) / 2**30:+.2f} GiB above the weights, "
              f"{(r['peak'] - r['built']) / 2**30:+.2f} GiB above the process before the job), "
              f"{r['params']:,} parameters after", flush=True)  # fmt: skip
    if len(results) == 2:
        seq, whole = results["sequential"], results["whole"]
        gib = 2**30
        print(
            f"weights {seq['weights'] / gib:.2f} GiB ({args.blocks} blocks, {args.windows} x 512 tokens)"
        )
        print(f"sequential / whole: time {seq['seconds'] / whole['seconds']:.2f}x, peak "
              f"{seq['peak'] / whole['peak']:.2f}x; sequential peak - weights "
              f"{(seq['peak'] - seq['weights']) / gib:.2f} GiB (goal <= 1.5)")  # fmt: skip
    return results


if __name__ == "__main__":
    main()
