"""Eigendecompositions of many PCA layers: the CPU ones side by side, one thread each."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextvars import ContextVar
from functools import partial
from typing import Any

import torch

from .._progress import progress_bar, step
from .pca import PCALayer

__all__ = [
    "compute_eigenspaces",
    "compute_eigenvectors",
    "one_at_a_time",
    "problem_width",
    "releasing_statistics",
    "side_by_side",
]

_ONE_AT_A_TIME: ContextVar[bool] = ContextVar("pcasurgery_one_at_a_time", default=False)
_RELEASING: ContextVar[bool] = ContextVar("pcasurgery_releasing_statistics", default=False)


@contextlib.contextmanager
def releasing_statistics() -> Iterator[None]:
    """Within, :func:`compute_eigenspaces` with the eigenvectors frees each layer's
    statistics (``PCALayer.release_statistics``) as soon as its eigenspace is installed,
    for a caller that reads only the eigenspaces after (``compress_sequential``): the
    statistics of the layers decomposed and the eigenvectors of those still waiting are
    never all held at once (0.2 GiB less at a TinyLlama-shaped block's peak)."""
    token = _RELEASING.set(True)
    try:
        yield
    finally:
        _RELEASING.reset(token)


@contextlib.contextmanager
def one_at_a_time() -> Iterator[None]:
    """Within, :func:`side_by_side` runs its jobs one after another, each on every thread:
    one decomposition's memory at a time instead of one per worker (a 5632 x 2048 layer's
    eigenvectors take 0.25 GiB), for 5 % to 15 % more time on two cores (``eigh`` of four
    matrices 1024 to 4096 wide; ``compress_sequential``, which promises one block's memory).

    Jobs of little memory (``small``: the eigenvalues alone, a few squares of the width
    each) still run side by side: a two-thread ``eigvalsh`` is no faster than a one-thread
    one, so one after another they would take 1.5x to 1.8x as long (four matrices 1024
    to 4096 wide, two cores; ``compress_sequential``'s first pass and
    ``calibrate_sequential`` decompose that way)."""
    token = _ONE_AT_A_TIME.set(True)
    try:
        yield
    finally:
        _ONE_AT_A_TIME.reset(token)


def compute_eigenspaces(
    layers: Iterable[PCALayer], progress: bool | None = False, *, vectors: bool = True
) -> None:
    """``compute_eigenspace`` for each layer, the CPU layers side by side.

    Each CPU layer's whole computation (its matrix, the float64 decomposition
    with one LAPACK thread, its projection) runs in a pool of as many workers
    as ``torch.get_num_threads()``, largest first. On a shared machine a
    multi-threaded ``eigh`` stalls whenever one of its threads is descheduled;
    independent one-thread decompositions do not, and on an idle one they keep
    every core busy too. Layers on a GPU run where their statistics live, one
    after another. A layer whose statistics are a module's input moments mapped
    through its weights (its square held as factors, ``layers.through``)
    decomposes the narrower input-wide problem.

    Args:
        layers: the layers.
        progress: a bar over the layers (``pcasurgery._progress``), advancing by
            each decomposition's cost (the cube of the width it decomposes).
        vectors: False: the eigenvalues only (a third of the work), the
            eigenvectors and projections waiting for their first use
            (``PCALayer.compute_eigenvectors``; :func:`compute_eigenvectors` for many).
    """
    layers = list(layers)
    for layer in layers:  # fail before any layer changes
        with torch.inference_mode(False):
            layer._check_statistics()
    on_cpu = sorted(
        (layer for layer in layers if layer.shift.device.type == "cpu"),
        key=lambda layer: -problem_width(layer),
    )
    elsewhere = [layer for layer in layers if layer.shift.device.type != "cpu"]
    costs = [float(problem_width(layer)) ** 3 for layer in on_cpu + elsewhere]
    with progress_bar(
        progress, desc="decompositions", unit="layer", total=sum(costs), steps=len(costs)
    ) as bar:
        release = vectors and _RELEASING.get()  # read here: workers have their own context
        side_by_side(
            [partial(_install, layer, vectors, release) for layer in on_cpu],
            on_done=lambda i: step(bar, costs[i]),
            small=not vectors,
        )
        for i, layer in enumerate(elsewhere, start=len(on_cpu)):
            _install(layer, vectors, release)
            step(bar, costs[i])


def problem_width(layer: PCALayer) -> int:
    """The width of the problem the layer's spectrum comes from: the layer's own, or for a
    layer whose statistics are a module's input moments mapped through its weights, held
    as factors (``layers.through``), the input's, which bounds the spectrum's rank."""
    factors = layer._square_factors
    return layer.width if factors is None else int(factors.weight.shape[1])


def side_by_side(
    jobs: Sequence[Callable[[], Any]],
    on_done: Callable[[int], Any] | None = None,
    small: bool = False,
) -> None:
    """Run CPU ``jobs`` in a pool of ``torch.get_num_threads()`` workers of one thread each.

    Jobs start in the order given (largest first keeps the workers even). With
    one thread, or one job, they run here, one after another. ``on_done(i)`` is
    called here (not in a worker) as job ``i`` ends well. The first error is
    raised once every job has ended. Within :func:`one_at_a_time`, one after another,
    unless the jobs are ``small`` (of little memory each).
    """
    workers = min(torch.get_num_threads(), len(jobs))
    if workers <= 1 or (_ONE_AT_A_TIME.get() and not small):
        for i, job in enumerate(jobs):
            job()
            if on_done is not None:
                on_done(i)
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="pcasurgery") as pool:
            futures = {pool.submit(_one_thread, job): i for i, job in enumerate(jobs)}
            for future in as_completed(futures):
                if on_done is not None and future.exception() is None:
                    on_done(futures[future])
            for future in futures:
                future.result()
    finally:
        torch.set_num_threads(threads)


def _install(layer: PCALayer, vectors: bool = True, release: bool = False) -> None:
    """Decompose the layer's checked statistics, install the result (and free the
    statistics, with ``release``)."""
    values, eigenvectors = layer._decomposition(vectors, checked=True)
    if eigenvectors is None:
        layer._install_eigenvalues(values)
    else:
        layer._install_spectrum(values, eigenvectors)
        if release:
            layer.release_statistics()


def _one_thread(job: Callable[[], Any]) -> None:
    torch.set_num_threads(1)  # the worker's own OpenMP/MKL setting
    job()


def compute_eigenvectors(layers: Iterable[PCALayer], progress: bool | None = False) -> None:
    """``PCALayer.compute_eigenvectors`` for the layers whose eigenvectors are pending, the
    CPU ones side by side (as :func:`compute_eigenspaces`), largest first."""
    pending = sorted(
        (layer for layer in layers if layer.eigenvectors_pending),
        key=lambda layer: -problem_width(layer),
    )
    on_cpu = [layer for layer in pending if layer.shift.device.type == "cpu"]
    elsewhere = [layer for layer in pending if layer.shift.device.type != "cpu"]
    costs = [float(problem_width(layer)) ** 3 for layer in on_cpu + elsewhere]
    with progress_bar(
        progress, desc="eigenvectors", unit="layer", total=sum(costs), steps=len(costs)
    ) as bar:
        side_by_side(
            [layer.compute_eigenvectors for layer in on_cpu], on_done=lambda i: step(bar, costs[i])
        )
        for i, layer in enumerate(elsewhere, start=len(on_cpu)):
            layer.compute_eigenvectors()
            step(bar, costs[i])
