"""``export_onnx``: write a model as ONNX and check it in onnxruntime."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .._batches import model_inputs
from .._errors import OnnxCheckError, add_context
from .._progress import check_progress, progress_bar
from .._validation import check_bool, check_module, check_positive_int, kept_modes
from ..layers.sites import sites_of

__all__ = ["export_onnx", "run_onnx"]

log = logging.getLogger("pcasurgery")


def _outputs(result: Any, where: str = "output") -> list[tuple[str, Tensor]]:
    """The tensors a model returned, named, in order; caches and other non-tensors are skipped.

    A mapping (a transformers ``ModelOutput``: ``logits``, ``last_hidden_state``...)
    keeps its tensor fields; a tuple or list is flattened.
    """
    if isinstance(result, Tensor):
        return [(where, result)]
    if isinstance(result, Mapping):
        return [
            pair
            for key, value in result.items()
            if isinstance(value, (Tensor, Mapping, tuple, list))
            for pair in _outputs(value, str(key))
        ]
    if isinstance(result, (tuple, list)):
        return [
            pair
            for i, r in enumerate(result)
            if isinstance(r, (Tensor, Mapping, tuple, list))
            for pair in _outputs(r, f"{where}[{i}]")
        ]
    raise TypeError(f"the model returned {type(result).__name__}; export needs tensors")


class _Flat(nn.Module):
    """The model with positional tensor inputs and a tuple of tensor outputs, as ONNX wants."""

    def __init__(self, model: nn.Module, positional: int, keywords: list[str]):
        super().__init__()
        self.model, self.positional, self.keywords = model, positional, keywords

    def forward(self, *tensors: Tensor) -> tuple[Tensor, ...]:
        args = tensors[: self.positional]
        kwargs = dict(zip(self.keywords, tensors[self.positional :], strict=True))
        return tuple(t for _, t in _outputs(self.model(*args, **kwargs)))


@contextlib.contextmanager
def _no_cache(model: nn.Module):
    """Switch a transformers model's key/value cache off (its outputs are then plain tensors)."""
    config = getattr(model, "config", None)
    cached = getattr(config, "use_cache", None)
    if cached:
        config.use_cache = False  # type: ignore[union-attr]
    try:
        yield
    finally:
        if cached:
            config.use_cache = cached  # type: ignore[union-attr]


@contextlib.contextmanager
def _quiet(verbose: bool):
    """Silence the exporter's progress lines, warnings and logged tracebacks unless ``verbose``."""
    if verbose:
        yield
        return
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript", "onnx_ir")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


# The relative tolerance of the onnxruntime check, by output dtype (float32 and wider: 1e-4).
_RTOL = {torch.float16: 1e-2, torch.bfloat16: 5e-2}


def _smallest(dtype: torch.dtype) -> float:
    """The smallest positive normal number of a floating dtype (0 for integers)."""
    return float(torch.finfo(dtype).tiny) if dtype.is_floating_point else 0.0


def _check_opset(opset: object) -> int | None:
    if opset is None:
        return None
    import onnx

    opset = check_positive_int(opset, "opset")
    newest = onnx.defs.onnx_opset_version()
    if opset > newest:
        raise ValueError(
            f"opset must be at most {newest} (the newest the installed onnx knows), got {opset}"
        )
    return opset


def _written_opset(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _require(module: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ImportError(
            f"ONNX export and checking need the {module} package: "
            "pip install 'pcasurgery[export]' (onnx, onnxscript, onnxruntime)"
        )


def run_onnx(path: str | Path, *inputs: Tensor) -> list:
    """Run an ONNX file in onnxruntime (CPU) on ``inputs``; returns its outputs as arrays."""
    _require("onnxruntime")
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    feeds = {n: t.detach().cpu().numpy() for n, t in zip(names, inputs, strict=True)}
    return session.run(None, feeds)


def _variants(
    inputs: tuple[Tensor, ...], dynamic_batch: bool, sequence: bool
) -> list[tuple[Tensor, ...]]:
    """The example, and (for the dynamic dimensions) another batch size and sequence length."""
    variants = [inputs]
    if dynamic_batch:
        n = inputs[0].shape[0]
        m = n + 3 if n > 1 else 3
        reps = -(-m // n)
        variants.append(tuple(torch.cat([t] * reps)[:m] for t in inputs))
    if sequence and inputs[0].shape[1] > 1:
        variants.append(tuple(t[:, :-1] for t in inputs))
    return variants


def export_onnx(
    model: nn.Module,
    example_inputs: Any,
    path: str | Path,
    *,
    dynamic_batch: bool = True,
    check: bool = True,
    opset: int | None = None,
    verbose: bool = False,
    progress: bool | None = None,
) -> Path:
    """Write ``model`` to ``path`` as ONNX, and check it against PyTorch in onnxruntime.

    Works for compressed models and for projecting (wrapped, calibrated) ones.
    The model is exported in eval mode (its flags are restored). Its outputs
    are the tensors it returns, flattened in order; a mapping (a transformers
    ``ModelOutput``) gives its tensor fields (``logits``, ``last_hidden_state``),
    and a transformers model's key/value cache is switched off for the export.

    Args:
        model: the network.
        example_inputs: a tensor, a tuple of tensors, or a dict of keyword
            tensors (a tokenizer's output), batch first. With a dict of
            ``(batch, tokens)`` tensors the sequence length is dynamic too.
        path: the ``.onnx`` file to write; its folder must exist.
        dynamic_batch: make the batch dimension of every input dynamic.
        check: run the file in onnxruntime on the example, on another batch
            size and (for token inputs) on another sequence length, and raise
            unless every output is within
            ``rtol * max |output|`` of PyTorch's (relative to each output's own
            scale, however small; integer outputs must match), where ``rtol`` is 1e-4
            for float32 and wider outputs, 1e-2 for float16 and 5e-2 for bfloat16.
        opset: ONNX opset version (the exporter's default when None). The
            exporter writes opset 18 and converts to others; an opset newer than
            the installed onnx knows, or one it cannot convert the model to
            (usually below 17), is a ``ValueError`` and no file is left.
        verbose: let the exporter print its progress.
        progress: a bar over the steps: the reference forward, the export, then
            each onnxruntime check (``None``: in a terminal, after two seconds;
            see ``calibrate``).

    Returns:
        The path written.

    Raises:
        ValueError: a missing folder, an unsupported opset, or a wrapped model
            with PCA layers after ``F.linear`` calls (export it compressed).
        Exception: whatever the model raises on ``example_inputs``, with its own
            type and the input shapes added as a note.
        OnnxCheckError: onnxruntime disagrees with PyTorch (max error and batch sizes said).
    """
    check_module(model)
    functional = [site.name for site in sites_of(model) if site.attachment == "function"]
    if functional:
        raise ValueError(
            f"model uses {', '.join(functional)} through F.linear on their weights; the ONNX "
            "exporter does not see the PCA layers that follow those calls: export the "
            "compressed model (pcasurgery.compress(model)) instead"
        )
    args, kwargs = model_inputs(example_inputs)
    check_bool(dynamic_batch, "dynamic_batch")
    check_bool(check, "check")
    check_bool(verbose, "verbose")
    progress = check_progress(progress)
    path = Path(path)
    if not path.parent.exists():
        raise ValueError(f"path {str(path)!r}: folder {str(path.parent)!r} does not exist")
    for module in ("onnx", "onnxscript") + (("onnxruntime",) if check else ()):
        _require(module)
    opset = _check_opset(opset)
    if not all(isinstance(t, Tensor) for t in (*args, *kwargs.values())):
        raise TypeError("example_inputs must hold tensors only (no None or other values)")
    names = [f"input_{i}" for i in range(len(args))] + list(kwargs)
    inputs = (*args, *kwargs.values())
    lengths = {t.shape[1] for t in kwargs.values() if t.dim() == 2}
    sequence = bool(kwargs) and len(lengths) == 1 and all(t.dim() == 2 for t in kwargs.values())
    flat = _Flat(model, len(args), list(kwargs))

    variants = _variants(inputs, dynamic_batch, sequence) if check else []
    bar = progress_bar(progress, desc="exporting", unit="step", total=2 + len(variants))
    with kept_modes(model), torch.no_grad(), _no_cache(model), bar:
        model.eval()
        try:
            expected = _outputs(model(*args, **kwargs))
        except Exception as err:
            shapes = [tuple(t.shape) for t in inputs]
            add_context(err, f"(raised by the model on example_inputs of shapes {shapes})")
            raise
        bar.update()
        dims: dict[int, Any] = {}
        if dynamic_batch:
            dims[0] = torch.export.Dim("batch", min=1)
        if sequence:
            dims[1] = torch.export.Dim("sequence", min=1)
        _write(flat, inputs, names, path, dims=dims, opset=opset, verbose=verbose)
        bar.update()
        if check:
            _check_in_onnxruntime(flat, path, variants, [t for _, t in expected], bar.update)
    log.info("exported outputs: %s", ", ".join(name for name, _ in expected))
    return path


def _write(
    model: nn.Module,
    inputs: tuple[Tensor, ...],
    names: list[str],
    path: Path,
    *,
    dims: dict[int, Any],
    opset: int | None,
    verbose: bool,
) -> None:
    """Export with the dynamo exporter: one file, the dynamic dimensions and opset asked for."""
    # one self-contained file unless the weights approach protobuf's 2 GB limit
    weight_bytes = sum(
        t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]
    )
    kwargs: dict[str, Any] = {
        "dynamo": True,
        "verbose": verbose,
        "external_data": weight_bytes > 2**30,
        "input_names": names,
    }
    if opset is not None:
        kwargs["opset_version"] = opset
    if dims:
        # one entry for the *tensors parameter of _Flat.forward: a tuple, one dict per tensor
        kwargs["dynamic_shapes"] = (
            tuple({d: dim for d, dim in dims.items() if d < t.dim()} for t in inputs),
        )
    with _quiet(verbose):
        torch.onnx.export(model, inputs, str(path), **kwargs)
    if opset is not None and _written_opset(path) != opset:
        written = _written_opset(path)
        path.unlink()
        raise ValueError(
            f"opset={opset}: the exporter could not convert this model to it (it wrote "
            f"opset {written}, and writes 18 natively); choose an opset of at least 18, "
            "or None for the default"
        )


def _check_in_onnxruntime(
    model: nn.Module,
    path: Path,
    variants: list[tuple[Tensor, ...]],
    expected: list[Tensor],
    checked: Callable[[], Any] = lambda: None,
) -> None:
    """Compare onnxruntime with PyTorch on every input variant; raise if they differ.

    ``checked()`` is called after each variant.
    """
    shapes = [tuple(v[0].shape) for v in variants]
    for inputs in variants:
        reference = expected if inputs is variants[0] else list(model(*inputs))
        got = run_onnx(path, *inputs)
        where = f"inputs of shape {tuple(inputs[0].shape)}"
        for i, (ref, out) in enumerate(zip(reference, got, strict=True)):
            ref64 = ref.detach().cpu().to(torch.float64)
            out64 = torch.from_numpy(out).to(torch.float64)
            if out64.shape != ref64.shape:
                raise OnnxCheckError(
                    f"onnxruntime output {i} has shape {tuple(out64.shape)}, PyTorch's "
                    f"{tuple(ref64.shape)} ({where})"
                )
            error = float((out64 - ref64).abs().max()) if ref64.numel() else 0.0
            scale = float(ref64.abs().max()) if ref64.numel() else 0.0
            tolerance = _RTOL.get(ref.dtype, 1e-4) * max(scale, _smallest(ref.dtype))
            if not error <= tolerance:
                raise OnnxCheckError(
                    f"onnxruntime output {i} differs from PyTorch by up to {error:.3g} "
                    f"(tolerance {tolerance:.3g}) on {where}; checked input shapes {shapes}"
                )
        checked()
