"""The eigendecomposition's cost by width, driver, thread count and batching.

What calibration's last step chooses between (``layers.decompose.compute_eigenspaces``):
for ``count`` symmetric positive semi-definite float64 matrices of each width,
the seconds per matrix of

* ``eigh`` one after another (on a CPU with 1 thread and with ``--threads``);
* ``eigvalsh`` (eigenvalues only) one after another;
* ``eigh`` of all of them stacked into one batched call;
* side by side: ``eigh`` in a pool of ``--threads`` one-thread CPU workers,
  as calibration runs the CPU layers (``layers.decompose.side_by_side``); on a GPU
  the matrices go to the host and the results come back;
* streams (GPU only): ``--threads`` host threads, each on its own CUDA stream.

On a GPU (``--device cuda``) the rest runs on the device, synchronised. Matrices
are Gram matrices of random data with a decaying spectrum, as calibration's are.

Usage: python benchmarks/bench_eigh.py [--widths 576 1536 4096] [--count 4]
           [--threads 2] [--device cuda]
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import torch

from pcasurgery.layers.decompose import side_by_side


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


def on_streams(a: torch.Tensor, workers: int) -> None:
    """``eigh`` of each matrix, ``workers`` host threads with a CUDA stream each."""
    streams = [torch.cuda.Stream(a.device) for _ in range(workers)]
    current = torch.cuda.current_stream(a.device)

    def one(i: int) -> None:
        stream = streams[i % workers]
        stream.wait_stream(current)
        with torch.cuda.stream(stream):
            torch.linalg.eigh(a[i])

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, range(len(a))))
    for stream in streams:
        current.wait_stream(stream)


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
    print(f"{args.count} float64 matrices per width on {device}; seconds per matrix (best of 2); "
          f"side by side: {args.threads} one-thread CPU workers (from and back to {device}); "
          f"streams: {args.threads} host threads with a CUDA stream each")  # fmt: skip
    columns = ("eigh", "eigh threads", "eigvalsh", "batched", "side by side", "streams")
    print(f"{'width':>6s}" + "".join(f"{c:>13s}" for c in columns))
    for width in args.widths:
        a = gram(width, args.count, device)
        row = {"width": float(width)}

        def each(fn, a=a):
            return lambda: [fn(m) for m in a]

        def host_pool(a=a):
            out = [None] * len(a)
            host = a.cpu()

            def job(i):
                out[i] = tuple(t.to(device) for t in torch.linalg.eigh(host[i]))

            side_by_side([partial(job, i) for i in range(len(a))])

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        row["eigh"] = seconds(each(torch.linalg.eigh), device) / args.count
        torch.set_num_threads(args.threads)
        if device.type == "cpu":
            row["eigh threads"] = seconds(each(torch.linalg.eigh), device) / args.count
        row["eigvalsh"] = seconds(each(torch.linalg.eigvalsh), device) / args.count
        row["batched"] = seconds(lambda a=a: torch.linalg.eigh(a), device) / args.count
        row["side by side"] = seconds(host_pool, device) / args.count
        if device.type == "cuda":
            row["streams"] = seconds(lambda a=a: on_streams(a, args.threads), device) / args.count
        torch.set_num_threads(threads)
        rows.append(row)
        print(f"{width:6d}" + "".join(f"{row.get(c, float('nan')):13.4f}" for c in columns),
              flush=True)  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
