"""The eigendecomposition's cost by width, driver, thread count and batching.

What calibration's last step chooses between (``layers.pca.compute_eigenspaces``):
for ``count`` symmetric positive semi-definite float64 matrices of each width,
the seconds per matrix of

* ``eigh`` one after another (on a CPU with 1 thread and with ``--threads``);
* ``eigvalsh`` (eigenvalues only) one after another;
* ``eigh`` of all of them stacked into one batched call.

On a GPU (``--device cuda``) the same on the device, synchronised. Matrices
are Gram matrices of random data with a decaying spectrum, as calibration's are.

Usage: python benchmarks/bench_eigh.py [--widths 576 1536 4096] [--count 4]
           [--threads 2] [--device cuda]
"""

from __future__ import annotations

import argparse
import time

import torch


def gram(width: int, count: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(width)
    scales = torch.logspace(0, -4, width, dtype=torch.float64)
    x = torch.randn(count, width, 2 * width, generator=g, dtype=torch.float64) * scales[:, None]
    return (x @ x.mT / (2 * width)).to(device)


def seconds(fn, device: torch.device, repeats: int = 2) -> float:
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def main(argv=None) -> list[dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[576, 1536])
    parser.add_argument("--count", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.linalg.eigh(gram(8, 1, device)[0])  # load the solver
    rows = []
    print(f"{args.count} float64 matrices per width on {device}; seconds per matrix (best of 2)")
    print(f"{'width':>6s} {'eigh seq':>9s} {'eigh seq (threads)':>19s} {'eigvalsh':>9s} "
          f"{'eigh batched':>13s}")  # fmt: skip
    for width in args.widths:
        a = gram(width, args.count, device)
        row = {"width": float(width)}

        def each(fn, a=a):
            return lambda: [fn(m) for m in a]

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        row["eigh"] = seconds(each(torch.linalg.eigh), device) / args.count
        torch.set_num_threads(args.threads)
        if device.type == "cpu":
            row["eigh threads"] = seconds(each(torch.linalg.eigh), device) / args.count
        row["eigvalsh"] = seconds(each(torch.linalg.eigvalsh), device) / args.count
        row["batched"] = seconds(lambda a=a: torch.linalg.eigh(a), device) / args.count
        torch.set_num_threads(threads)
        rows.append(row)
        print(f"{width:6d} {row['eigh']:9.4f} {row.get('eigh threads', float('nan')):19.4f} "
              f"{row['eigvalsh']:9.4f} {row['batched']:13.4f}", flush=True)  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
