"""Compress a causal language model in one command: ``python -m pcasurgery compress-lm``.

``python -m pcasurgery compress-lm MODEL --text FILE --remove 0.2 --out DIR``

MODEL is a local transformers folder (``config.json``, weights, tokenizer) or
a GGUF file (de-quantised to float32 on load; needs the ``gguf`` package).
The job:

1. checks its input (files, the budget, ``--out``, enough text for the
   windows, decoder blocks the glob finds) before any long work;
2. tokenizes the text and cuts it into disjoint windows: calibration and
   planning windows spread over the first 90 % of the tokens, held-out windows
   over the last 10 % (printed, and written to ``summary.json``);
3. measures the dense model: held-out perplexity, greedy continuations of a
   few held-out prompts;
4. wraps the decoder blocks' projections with PCA layers and calibrates them;
5. plans per-layer ranks that remove ``--remove`` of the blocks' projection
   parameters, weighed by the language-model loss's gradient on the planning
   windows (``budget_plan(loss=..., data=...)``), and compresses the blocks one
   at a time at those ranks, each calibrated on the compressed blocks' outputs,
   each layer keeping the directions that matter to the loss (its output
   features weighed by the loss's gradient on the planning windows:
   ``compress_sequential(plan=..., propagate="compressed", loss=..., loss_data=...)``);
6. measures the compressed model the same way, writes the checkpoint (loads
   with ``AutoModelForCausalLM.from_pretrained(DIR/model, trust_remote_code=True)``
   where pcasurgery is not installed), reloads it to check its perplexity, and
   writes ``report.csv``, ``plan.csv``, ``saturation.png`` and ``summary.json``
   (perplexities, parameters, the seconds of each step, the continuations side
   by side).

With ``--from-disk`` (a model larger than memory, in a transformers folder of
safetensors), the model is built on ``meta`` and its blocks are read from the
folder one at a time in every step: the perplexities are measured block by
block (``forward_sequential``), the saturation report and the plan come from
a first pass that keeps the eigenvalues and the loss's gradient along each
eigenvector (``calibrate_sequential(loss=...)``: the same loss-weighed plan),
each compressed block is written to ``DIR/model`` as it is done (in the
checkpoint's dtype), and the check evaluates the written checkpoint with its
own class (transformers, ``trust_remote_code``) block by block. There are no
continuations (generation needs the whole model in memory).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ._validation import check_writable
from .analysis import (
    budget_plan,
    calibrate_sequential,
    compress_sequential,
    forward_sequential,
    plot_saturation,
    report,
)
from .compression import count_params
from .surgery import calibrate, pca_wrap

__all__ = ["add_arguments", "perplexity", "run_compress_lm", "split_windows"]

HELD_OUT = 0.1  # the last tenth of the tokens is held out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's arguments (see the module docstring)."""
    parser.add_argument("model", help="a local transformers folder, or a .gguf file")
    parser.add_argument(
        "--text", required=True, help="a UTF-8 text file (calibration and evaluation)"
    )
    parser.add_argument(
        "--remove",
        type=float,
        required=True,
        help="fraction of the decoder blocks' projection parameters to remove, in (0, 1)",
    )
    parser.add_argument("--out", required=True, help="folder for the checkpoint and the reports")
    parser.add_argument(
        "--blocks",
        default=None,
        help="glob of the decoder blocks (default: the model's largest list of "
        "identical blocks, e.g. model.layers.*)",
    )
    parser.add_argument("--window", type=int, default=256, help="tokens per window (default 256)")
    parser.add_argument(
        "--calibration", type=int, default=16, help="calibration windows (default 16)"
    )
    parser.add_argument("--planning", type=int, default=8, help="planning windows (default 8)")
    parser.add_argument("--held-out", type=int, default=16, help="held-out windows (default 16)")
    parser.add_argument("--batch", type=int, default=4, help="windows per forward (default 4)")
    parser.add_argument(
        "--prompts", type=int, default=3, help="held-out prompts to continue (default 3)"
    )
    parser.add_argument(
        "--new-tokens", type=int, default=48, help="tokens per continuation (default 48)"
    )
    parser.add_argument(
        "--no-check", action="store_true", help="skip reloading the written checkpoint"
    )
    parser.add_argument(
        "--from-disk",
        action="store_true",
        help="for a model larger than memory: read its blocks from the folder one at a "
        "time in every step (no continuations)",
    )
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bars (default: in a terminal)",
    )


@dataclass(frozen=True)
class Windows:
    """Token offsets ``(start, stop)`` of the disjoint windows of each role."""

    calibration: list[tuple[int, int]]
    planning: list[tuple[int, int]]
    held_out: list[tuple[int, int]]

    def as_dict(self) -> dict[str, list[list[int]]]:
        return {
            role: [list(w) for w in getattr(self, role)]
            for role in ("calibration", "planning", "held_out")
        }


def _spread(slots: int, count: int) -> list[int]:
    """``count`` distinct slot indices, evenly spread over ``range(slots)``."""
    return sorted({int(round(i)) for i in np.linspace(0, slots - 1, count)}) if count else []


def split_windows(
    tokens: int, length: int, calibration: int, planning: int, held_out: int
) -> Windows:
    """Disjoint windows of ``length`` tokens: calibration and planning ones (interleaved)
    over the first 90 % of ``tokens``, held-out ones over the last 10 %.

    Raises:
        ValueError: the text is too short for the windows asked (says how many tokens
            each part has and needs).
    """
    cut = int(tokens * (1 - HELD_OUT))
    first, last = cut // length, (tokens - cut) // length
    needed = calibration + planning
    if first < needed or last < held_out:
        raise ValueError(
            f"--text has {tokens:,} tokens: its first 90 % ({cut:,} tokens) holds {first} windows "
            f"of {length} and its last 10 % holds {last}, but {calibration} calibration + "
            f"{planning} planning and {held_out} held-out windows are asked; give a longer text, "
            f"or fewer or shorter windows (--window, --calibration, --planning, --held-out)"
        )
    chosen = _spread(first, needed)
    planned = {chosen[i] for i in _spread(needed, planning)} if planning else set()
    span = lambda slot, base=0: (base + slot * length, base + (slot + 1) * length)  # noqa: E731
    return Windows(
        calibration=[span(s) for s in chosen if s not in planned],
        planning=[span(s) for s in chosen if s in planned],
        held_out=[span(s, cut) for s in _spread(last, held_out)],
    )


def _batches(
    ids: list[int], windows: list[tuple[int, int]], size: int
) -> list[dict[str, torch.Tensor]]:
    rows = torch.tensor([ids[a:b] for a, b in windows], dtype=torch.long)
    return [{"input_ids": rows[i : i + size]} for i in range(0, len(rows), size)]


@torch.inference_mode()
def perplexity(
    model: nn.Module, batches: list[dict[str, torch.Tensor]], blocks: str | None = None,
    weights: Path | None = None, progress: bool | None = None,
) -> float:  # fmt: skip
    """``exp`` of the mean next-token loss over every position of the windows but their first.

    With ``blocks`` (and ``weights``: a model on ``meta`` and its checkpoint), the blocks
    run one at a time (``forward_sequential``)."""
    model.eval()
    if blocks is None:
        sums = [_loss_sum(model, batch) for batch in batches]
    else:
        sums = forward_sequential(
            model, batches, blocks=blocks, forward=_loss_sum, weights=weights, progress=progress
        )
    return math.exp(sum(total for total, _ in sums) / sum(count for _, count in sums))


def _loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[float, int]:
    """The summed next-token loss of a batch, and the tokens it counts."""
    logits = model(**batch, use_cache=False).logits[:, :-1]
    target = batch["input_ids"][:, 1:]
    loss = nn.functional.cross_entropy(
        logits.flatten(0, 1).float(), target.flatten(), reduction="sum"
    )
    return float(loss), target.numel()


def _lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch, labels=batch["input_ids"], use_cache=False).loss


@torch.inference_mode()
def _continue(model: Any, tokenizer: Any, prompts: list[list[int]], new_tokens: int) -> list[str]:
    """Greedy continuations of each prompt (decoded new tokens only)."""
    texts = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.eos_token_id,
        )
        texts.append(tokenizer.decode(out[0, len(prompt) :], skip_special_tokens=True))
    return texts


def find_blocks(model: nn.Module) -> str:
    """The glob of the model's decoder blocks: its largest list of modules of one class."""
    best, size = None, 0
    for name, module in model.named_modules():
        if (
            isinstance(module, nn.ModuleList)
            and len(module)
            and len({type(m) for m in module}) == 1
        ):
            params = count_params(module)
            if params > size:
                best, size = name, params
    if best is None:
        raise ValueError(f"{type(model).__name__} has no list of blocks; name them with --blocks")
    return f"{best}.*"


def _check_blocks(model: nn.Module, glob: str) -> list[str]:
    """The block names ``glob`` matches, each holding a Linear (or Conv1D) projection."""
    names = [name for name, _ in model.named_modules() if name and fnmatch.fnmatchcase(name, glob)]
    outermost = set(names)
    blocks = [n for n in names if not any(n.startswith(m + ".") for m in outermost)]
    if not blocks:
        raise ValueError(
            f"--blocks {glob!r} matches no module of {type(model).__name__} "
            f"(its blocks: {find_blocks(model)!r})"
        )
    return blocks


def _load(model: str, what: str) -> Any:
    """The tokenizer, or the model (float32, eval), of a folder or a .gguf file."""
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as err:
        raise ImportError("compress-lm needs transformers: pip install 'pcasurgery[llm]'") from err
    path = Path(model)
    folder, extra = (path, {}) if path.is_dir() else (path.parent, {"gguf_file": path.name})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if what == "tokenizer":
            return AutoTokenizer.from_pretrained(folder, **extra)
        lm = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **extra).eval()
    quantizer = getattr(lm, "hf_quantizer", None)
    method = str(getattr(getattr(quantizer, "quantization_config", None), "quant_method", ""))
    if "gguf" in method.lower() and all(p.dtype == torch.float32 for p in lm.parameters()):
        # a GGUF file de-quantised on load: plain float32 layers, saved as such
        lm.hf_quantizer = None
        lm.config.__dict__.pop("quantization_config", None)
    return lm


def _on_meta(model: str) -> Any:
    """The model of a transformers folder built on ``meta`` (float32, eval; nothing
    allocated), and the dtype its checkpoint holds."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = AutoConfig.from_pretrained(model)
        with init_empty_weights():
            lm = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    return lm, stored if isinstance(stored, torch.dtype) else torch.float32


def _check_from_disk(model: str, out: Path) -> None:
    """``--from-disk`` needs a folder of safetensors and a new ``DIR/model``."""
    path = Path(model)
    if not path.is_dir() or not any(path.glob("*.safetensors")):
        raise ValueError(
            f"--from-disk reads the blocks from a transformers folder of safetensors files; "
            f"MODEL {model!r} is not one (a .gguf file or another format: leave --from-disk out)"
        )
    try:
        import accelerate  # noqa: F401
    except ImportError as err:
        raise ImportError("--from-disk needs accelerate: pip install 'pcasurgery[llm]'") from err
    if (out / "model").exists() and any((out / "model").iterdir()):
        raise ValueError(
            f"--out {str(out)!r} already holds a model folder, which --from-disk writes block "
            "by block: give a new --out, or remove its model folder"
        )


def _check_model_path(model: str) -> None:
    path = Path(model)
    if not path.exists():
        raise FileNotFoundError(f"MODEL {model!r}: no such file or folder")
    if path.is_dir() and not (path / "config.json").is_file():
        raise ValueError(
            f"MODEL {model!r} is a folder without config.json: give a transformers "
            "model folder or a .gguf file"
        )
    if path.is_file() and path.suffix != ".gguf":
        raise ValueError(f"MODEL {model!r} is a file but not a .gguf file")
    if path.is_file():
        try:
            import gguf  # noqa: F401
        except ImportError as err:
            raise ImportError(
                "loading a .gguf file needs the gguf package: pip install gguf"
            ) from err


class _Steps:
    """Prints each step as it starts, and times it."""

    def __init__(self, total: int):
        self.total, self.done = total, 0
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, key: str, title: str) -> Iterator[None]:
        self.done += 1
        print(f"[{self.done}/{self.total}] {title}", flush=True)
        start = time.perf_counter()
        yield
        self.seconds[key] = round(time.perf_counter() - start, 2)


def run_compress_lm(
    args: argparse.Namespace, *, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Run the job (see the module docstring); returns the summary written to ``summary.json``.

    Raises:
        FileNotFoundError: MODEL or ``--text`` does not exist.
        ValueError: bad input (the budget, ``--out``, windows, blocks), named, before any
            long work.
    """
    started = time.perf_counter()
    if not (isinstance(args.remove, float) and 0.0 < args.remove < 1.0):
        raise ValueError(f"--remove must be a fraction in (0, 1), got {args.remove!r}")
    lows = {
        "window": 2,
        "calibration": 1,
        "planning": 1,
        "held_out": 1,
        "batch": 1,
        "prompts": 0,
        "new_tokens": 1,
    }
    for name, low in lows.items():
        value = getattr(args, name)
        if not isinstance(value, int) or value < low:
            raise ValueError(
                f"--{name.replace('_', '-')} must be an integer >= {low}, got {value!r}"
            )
    _check_model_path(args.model)
    text_path = Path(args.text)
    if not text_path.is_file():
        raise FileNotFoundError(f"--text {args.text!r}: no such file")
    out = check_writable(args.out, "--out", folder=True)
    disk = bool(getattr(args, "from_disk", False))
    if disk:
        _check_from_disk(args.model, out)
    steps = _Steps(7)
    weights = Path(args.model) if disk else None

    with steps(
        "load", f"loading {args.model}" + (" on meta (weights stay on disk)" if disk else "")
    ):
        tokenizer = _load(args.model, "tokenizer")
        ids = tokenizer(text_path.read_text(encoding="utf-8")).input_ids
        windows = split_windows(
            len(ids), args.window, args.calibration, args.planning, args.held_out
        )
        if disk:
            model, stored = _on_meta(args.model)
        else:
            model = _load(args.model, "model")
        glob = args.blocks or find_blocks(model)
        blocks = _check_blocks(model, glob)
    calib = _batches(ids, windows.calibration, args.batch)
    planning = _batches(ids, windows.planning, args.batch)
    held = _batches(ids, windows.held_out, args.batch)
    log(
        f"      {len(ids):,} tokens; windows of {args.window} tokens (offsets in summary.json): "
        f"{len(windows.calibration)} calibration and {len(windows.planning)} planning windows in "
        f"tokens 0-{int(len(ids) * (1 - HELD_OUT)):,}, {len(windows.held_out)} held-out windows after; "
        f"blocks {glob} ({len(blocks)})"
    )
    prompts = [] if disk else [
        ids[a : a + min(32, args.window)] for a, _ in windows.held_out[: args.prompts]
    ]  # fmt: skip
    block_params = lambda m: sum(count_params(m.get_submodule(b)) for b in blocks)  # noqa: E731
    dense: dict[str, float] = {"params": count_params(model), "block_params": block_params(model)}
    sequential = {"blocks": glob, "progress": args.progress} if disk else {}

    with steps(
        "dense", "the dense model: held-out perplexity" + ("" if disk else " and continuations")
    ):
        dense["perplexity"] = perplexity(model, held, weights=weights, **sequential)
        dense_text = _continue(model, tokenizer, prompts, args.new_tokens)
    log(f"      perplexity {dense['perplexity']:.3f}")

    if disk:
        with steps(
            "calibrate",
            f"calibrating {glob} block by block for the eigenvalues, and the loss's gradients",
        ):
            spectra = calibrate_sequential(
                model, calib, blocks=glob, weights=weights, loss=_lm_loss, loss_data=planning,
                progress=args.progress,
            )  # fmt: skip
            table = report(spectra)
        with steps("plan", f"planning {args.remove:.0%} fewer parameters, weighed by the loss"):
            plan = budget_plan(spectra, remove=args.remove, progress=args.progress)
            del spectra
    else:
        with steps("calibrate", f"wrapping the projections of {glob} and calibrating"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a tied output layer is left alone, with a warning
                wrapped = pca_wrap(model, include=glob)
            # the loss-weighed plan reads every layer's eigenvectors: computed with the eigenvalues
            calibrate(wrapped, calib, progress=args.progress, eigenvectors=True)
            table = report(wrapped)
        with steps("plan", f"planning {args.remove:.0%} fewer parameters, weighed by the loss"):
            plan = budget_plan(
                wrapped, remove=args.remove, loss=_lm_loss, data=planning, progress=args.progress
            )
        del wrapped  # the plan holds the ranks; the dense model is compressed in place
    log(
        f"      {int((plan['action'] == 'factorised').sum())} of {len(plan)} projections factorised"
    )

    written = out / "model" if disk else None
    with steps("compress", "compressing block by block and measuring the compressed model"):
        small: Any = compress_sequential(
            model, calib, blocks=glob, plan=plan, propagate="compressed", progress=args.progress,
            weights=weights, out=written, out_dtype=stored if disk else None,
            loss=_lm_loss, loss_data=planning,  # each layer keeps the directions the loss needs
        )  # fmt: skip
        compressed: dict[str, float] = {
            "params": count_params(small),
            "block_params": block_params(small),
            "perplexity": perplexity(small, held, weights=written, **sequential),
        }
        small_text = _continue(small, tokenizer, prompts, args.new_tokens)
    log(
        f"      perplexity {compressed['perplexity']:.3f} "
        f"({compressed['perplexity'] / dense['perplexity']:.3f}x dense)"
    )

    with steps("save", f"writing the checkpoint and reports into {out}"):
        if not disk:  # --from-disk wrote it block by block
            small.save_pretrained(out / "model")
        tokenizer.save_pretrained(out / "model")
        table.to_csv(out / "report.csv", index=False)
        plan.to_csv(out / "plan.csv", index=False)
        plot_saturation(table, out / "saturation.png")

    with steps("check", "reloading the checkpoint with transformers (trust_remote_code)"):
        if not args.no_check:
            compressed["reloaded_perplexity"] = _reloaded_perplexity(
                out / "model", held, glob if disk else None, args.progress
            )

    removed = 1 - compressed["block_params"] / dense["block_params"]
    summary = {
        "model": args.model,
        "text": str(text_path),
        "blocks": glob,
        "remove": args.remove,
        "windows": {"length": args.window, "tokens": len(ids), **windows.as_dict()},
        "dense": dense,
        "compressed": compressed,
        "perplexity_ratio": compressed["perplexity"] / dense["perplexity"],
        "removed_block_params": removed,
        "removed_params": 1 - compressed["params"] / dense["params"],
        "seconds": {**steps.seconds, "total": round(time.perf_counter() - started, 2)},
        "continuations": [
            {"prompt": tokenizer.decode(p), "dense": d, "compressed": c}
            for p, d, c in zip(prompts, dense_text, small_text, strict=True)
        ],
        "checkpoint": str(out / "model"),
        "from_disk": disk,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    _print_summary(summary, log)
    return summary


def _reloaded_perplexity(
    folder: Path, held: list[dict[str, torch.Tensor]], blocks: str | None, progress: bool | None
) -> float:
    """The held-out perplexity of the written checkpoint, loaded with transformers alone
    (with ``blocks``: its own class built on ``meta``, its blocks read one at a time)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if blocks is None:
            again = AutoModelForCausalLM.from_pretrained(
                folder, trust_remote_code=True, dtype=torch.float32
            )
            return perplexity(again, held)
        from accelerate import init_empty_weights

        config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
        with init_empty_weights():
            again = AutoModelForCausalLM.from_config(
                config, trust_remote_code=True, dtype=torch.float32
            )
    return perplexity(again, held, blocks, folder, progress)


def _print_summary(summary: dict[str, Any], log: Callable[[str], None]) -> None:
    dense, small = summary["dense"], summary["compressed"]
    log("")
    log(f"      {'':28s} {'dense':>14s} {'compressed':>14s}")
    log(
        f"      {'held-out perplexity':28s} {dense['perplexity']:>14.3f} {small['perplexity']:>14.3f}"
        f"  {summary['perplexity_ratio']:.3f}x"
    )
    log(
        f"      {'parameters':28s} {dense['params']:>14,} {small['params']:>14,}"
        f"  {summary['removed_params']:.1%} fewer"
    )
    log(
        f"      {'decoder-block parameters':28s} {dense['block_params']:>14,} {small['block_params']:>14,}"
        f"  {summary['removed_block_params']:.1%} fewer"
    )
    if "reloaded_perplexity" in small:
        log(f"      {'reloaded checkpoint':28s} {'':>14s} {small['reloaded_perplexity']:>14.3f}")
    for item in summary["continuations"][:1]:
        log(f"      prompt     {item['prompt']!r}")
        log(f"      dense      {item['dense']!r}")
        log(f"      compressed {item['compressed']!r}")
    log(f"      seconds: {summary['seconds']}")
    log(
        f"      checkpoint: {summary['checkpoint']} (AutoModelForCausalLM.from_pretrained(..., "
        "trust_remote_code=True))"
    )
