"""One progress convention for the library's long steps.

Every function that can take more than a few seconds takes ``progress``:

* ``None`` (the default): a bar on standard error when it is a terminal and the
  ``CI`` environment variable is unset, shown once the step has run for
  :data:`DELAY` seconds (quick calls stay silent);
* ``True``: a bar at once, wherever the output goes;
* ``False``: no bar.

Bars are tqdm's, with a unit and a rate where one means something, and are
updated once per batch, layer or evaluation, never per element. A bar whose
steps differ in cost (the eigendecompositions) advances by each step's cost, so
that its time estimate is honest, and says the steps done beside it. The
library's messages go through the ``pcasurgery`` logger or warnings, never
through these bars.
"""

from __future__ import annotations

import os
import sys
from typing import Any

__all__ = ["DELAY", "check_progress", "progress_bar", "step"]

DELAY = 2.0  # seconds before an automatic bar appears


def check_progress(progress: object) -> bool | None:
    """Return ``progress`` if it is None, True or False, or raise naming it."""
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f"progress must be True, False or None (automatic), got {progress!r}")
    return progress


def _automatic() -> bool:
    stream = sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)()) and not os.environ.get("CI")


def progress_bar(
    progress: bool | None,
    *,
    desc: str,
    unit: str,
    total: float | None = None,
    steps: int | None = None,
) -> Any:
    """A tqdm bar following the convention above (disabled, it costs nothing).

    Args:
        progress: the caller's ``progress`` argument.
        desc: what runs (``"decompositions"``).
        unit: what one step is (``"layer"``, ``"batch"``, ``"evaluation"``).
        total: the steps to run, or their summed cost for a weighted bar.
        steps: for a weighted bar (``total`` a cost), the number of steps; the bar
            then shows ``done/steps unit`` beside the cost it has advanced by,
            through :func:`step`.
    """
    from tqdm.auto import tqdm

    progress = check_progress(progress)
    enabled = _automatic() if progress is None else progress
    delay = DELAY if progress is None else 0.0
    if steps is None:
        return tqdm(
            total=total, desc=desc, unit=unit, disable=not enabled, delay=delay, dynamic_ncols=True
        )
    bar = tqdm(
        total=total,
        desc=desc,
        disable=not enabled,
        delay=delay,
        dynamic_ncols=True,
        bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix} [{elapsed}<{remaining}]",
    )
    bar.steps, bar.done, bar.unit_name = steps, 0, unit
    bar.set_postfix_str(f"0/{steps} {unit}s", refresh=False)
    return bar


def step(bar: Any, cost: float = 1.0) -> None:
    """Advance a weighted bar (:func:`progress_bar` with ``steps``) by one step of ``cost``."""
    bar.done += 1
    bar.set_postfix_str(f"{bar.done}/{bar.steps} {bar.unit_name}s", refresh=False)
    bar.update(cost)
