"""``export_onnx``: write a model as ONNX and check it in onnxruntime."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .._errors import OnnxCheckError, add_context
from .._validation import check_bool, check_module, check_positive_int, kept_modes

__all__ = ["export_onnx", "run_onnx"]


def _as_args(example_inputs: Any) -> tuple[Tensor, ...]:
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    if not args or not all(isinstance(a, Tensor) for a in args):
        raise TypeError(
            "example_inputs must be a tensor or a tuple of tensors, got "
            f"{type(example_inputs).__name__}"
        )
    if any(a.dim() == 0 for a in args):
        raise ValueError("example_inputs must have a leading batch dimension")
    return args


def _outputs(result: Any) -> list[Tensor]:
    if isinstance(result, Tensor):
        return [result]
    if isinstance(result, (tuple, list)):
        return [t for r in result for t in _outputs(r)]
    if isinstance(result, dict):
        return [t for r in result.values() for t in _outputs(r)]
    raise TypeError(f"the model returned {type(result).__name__}; export needs tensors")


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


def _other_batch(args: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """The example inputs at another batch size (repeated and cut), for the dynamic-batch check."""
    n = args[0].shape[0]
    m = n + 3 if n > 1 else 3
    reps = -(-m // n)
    return tuple(torch.cat([a] * reps)[:m] for a in args)


def export_onnx(
    model: nn.Module,
    example_inputs: Any,
    path: str | Path,
    *,
    dynamic_batch: bool = True,
    check: bool = True,
    opset: int | None = None,
    verbose: bool = False,
) -> Path:
    """Write ``model`` to ``path`` as ONNX, and check it against PyTorch in onnxruntime.

    Works for compressed models and for projecting (wrapped, calibrated) ones.
    The model is exported in eval mode (its flags are restored).

    Args:
        model: the network.
        example_inputs: a tensor or tuple of tensors, batch first.
        path: the ``.onnx`` file to write; its folder must exist.
        dynamic_batch: make the batch dimension of every input dynamic.
        check: run the file in onnxruntime on the example and on another batch
            size, and raise unless every output is within
            ``rtol * max(1, max |output|)`` of PyTorch's, where ``rtol`` is 1e-4
            for float32 and wider outputs, 1e-2 for float16 and 5e-2 for bfloat16.
        opset: ONNX opset version (the exporter's default when None). The
            exporter writes opset 18 and converts to others; an opset newer than
            the installed onnx knows, or one it cannot convert the model to
            (usually below 17), is a ``ValueError`` and no file is left.
        verbose: let the exporter print its progress.

    Returns:
        The path written.

    Raises:
        ValueError: a missing folder or an unsupported opset.
        Exception: whatever the model raises on ``example_inputs``, with its own
            type and the input shapes added as a note.
        OnnxCheckError: onnxruntime disagrees with PyTorch (max error and batch sizes said).
    """
    check_module(model)
    args = _as_args(example_inputs)
    check_bool(dynamic_batch, "dynamic_batch")
    check_bool(check, "check")
    check_bool(verbose, "verbose")
    path = Path(path)
    if not path.parent.exists():
        raise ValueError(f"path {str(path)!r}: folder {str(path.parent)!r} does not exist")
    for module in ("onnx", "onnxscript") + (("onnxruntime",) if check else ()):
        _require(module)
    opset = _check_opset(opset)

    with kept_modes(model), torch.no_grad():
        model.eval()
        try:
            expected = _outputs(model(*args))
        except Exception as err:
            shapes = [tuple(a.shape) for a in args]
            add_context(err, f"(raised by the model on example_inputs of shapes {shapes})")
            raise
        _write(model, args, path, dynamic_batch=dynamic_batch, opset=opset, verbose=verbose)
        if check:
            _check_in_onnxruntime(model, path, args, expected, dynamic_batch)
    return path


def _write(
    model: nn.Module,
    args: tuple[Tensor, ...],
    path: Path,
    *,
    dynamic_batch: bool,
    opset: int | None,
    verbose: bool,
) -> None:
    """Export with the dynamo exporter: one file, dynamic batch, the opset asked for or none."""
    # one self-contained file unless the weights approach protobuf's 2 GB limit
    weight_bytes = sum(
        t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]
    )
    kwargs: dict[str, Any] = {
        "dynamo": True,
        "verbose": verbose,
        "external_data": weight_bytes > 2**30,
    }
    if opset is not None:
        kwargs["opset_version"] = opset
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1)
        kwargs["dynamic_shapes"] = tuple({0: batch} for _ in args)
    with _quiet(verbose):
        torch.onnx.export(model, args, str(path), **kwargs)
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
    args: tuple[Tensor, ...],
    expected: list[Tensor],
    dynamic_batch: bool,
) -> None:
    """Compare onnxruntime with PyTorch on ``args`` and on another batch size; raise if they differ."""
    batches = [args] + ([_other_batch(args)] if dynamic_batch else [])
    sizes = [b[0].shape[0] for b in batches]
    for inputs in batches:
        reference = expected if inputs is args else _outputs(model(*inputs))
        got = run_onnx(path, *inputs)
        for i, (ref, out) in enumerate(zip(reference, got, strict=True)):
            ref64 = ref.detach().cpu().to(torch.float64)
            out64 = torch.from_numpy(out).to(torch.float64)
            if out64.shape != ref64.shape:
                raise OnnxCheckError(
                    f"onnxruntime output {i} has shape {tuple(out64.shape)}, PyTorch's "
                    f"{tuple(ref64.shape)} (batch size {inputs[0].shape[0]})"
                )
            error = float((out64 - ref64).abs().max()) if ref64.numel() else 0.0
            scale = float(ref64.abs().max()) if ref64.numel() else 0.0
            tolerance = _RTOL.get(ref.dtype, 1e-4) * max(1.0, scale)
            if not error <= tolerance:
                raise OnnxCheckError(
                    f"onnxruntime output {i} differs from PyTorch by up to {error:.3g} "
                    f"(tolerance {tolerance:.3g}) at batch size {inputs[0].shape[0]}; "
                    f"checked batch sizes {sizes}"
                )
