"""Write docs/api.md from the docstrings of pcasurgery's public API.

Usage: python docs/gen_api.py  (the test suite checks that api.md is current)
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pcasurgery

SECTIONS = {
    "Surgery and calibration": ["pca_wrap", "pca_layers_of", "calibrate", "all_reduce_statistics"],
    "Analysis": [
        "report",
        "plot_saturation",
        "sweep",
        "allocate",
        "set_threshold",
        "set_centering",
        "inject_random_directions",
    ],  # fmt: skip
    "Compression and export": [
        "budget_plan",
        "apply_plan",
        "compression_plan",
        "compress",
        "count_params",
        "count_macs",
        "export_onnx",
        "OnnxCheckError",
    ],
    "Block by block, healing and saving": [
        "compress_sequential",
        "calibrate_sequential",
        "forward_sequential",
        "heal",
        "save_compressed",
        "load_compressed",
    ],
    "PCA layers": ["LinearPCALayer", "Conv2DPCALayer", "PCALayer", "NotCalibratedError"],
    "Statistics": ["TorchCovarianceMatrix"],
    "Training-time tracking": ["CheckLayerSat", "SaturationTracker"],
}
MODULES = ["pcasurgery.metrics", "pcasurgery.pca_layers", "pcasurgery.writers", "pcasurgery.core"]


def entry(name: str, obj) -> str:
    try:
        signature = str(inspect.signature(obj))
    except (TypeError, ValueError):
        signature = ""
    kind = "class" if inspect.isclass(obj) else "function"
    doc = inspect.cleandoc(obj.__doc__ or "(no docstring)")
    text = f"### `{name}{signature}`\n\n*{kind}*\n\n```text\n{doc}\n```\n"
    if inspect.isclass(obj):
        for attr, member in sorted(vars(obj).items()):
            if attr.startswith("_") or not (
                inspect.isfunction(member) or isinstance(member, property)
            ):
                continue
            summary = (inspect.getdoc(member) or "").splitlines()
            text += f"- `{attr}`: {summary[0] if summary else ''}\n"
    return text


def render() -> str:
    parts = ["# API reference\n", "Generated from the docstrings by `docs/gen_api.py`.\n"]
    documented = set()
    for title, names in SECTIONS.items():
        parts.append(f"## {title}\n")
        for name in names:
            parts.append(entry(name, getattr(pcasurgery, name)))
            documented.add(name)
    for module_name in MODULES:
        module = __import__(module_name, fromlist=["__all__"])
        parts.append(f"## `{module_name}`\n")
        parts.append(inspect.cleandoc(module.__doc__ or "") + "\n")
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.isfunction(obj) or inspect.isclass(obj):
                parts.append(entry(f"{module_name}.{name}", obj))
    missing = [n for n in pcasurgery.__all__ if n not in documented and not n.startswith("_")]
    parts.append("## Other public names\n\n" + ", ".join(f"`{n}`" for n in missing) + "\n")
    return "\n".join(parts)


if __name__ == "__main__":
    path = Path(__file__).with_name("api.md")
    path.write_text(render())
    print(f"wrote {path}")
