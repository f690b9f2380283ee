"""An LLM's output layer, run on the first calibration batch only.

A calibration reads the PCA layers' inputs. An LLM's output layer (its LM head,
``model.get_output_embeddings()`` in transformers' convention), when no PCA layer
follows it, computes logits that no statistic reads: a vocabulary-wide product
per token, a fifth of SmolLM2-135M's forward. :class:`TailSkip` runs the first
batch whole, counting the calls of every module that feeds a statistic and
recording where the output layer is called. Where that batch called the output
layer once, after every such module's last call, each later batch stops as the
output layer is about to run, provided every statistic's module has been called
exactly as often as in the first batch by then; otherwise the batch runs whole.
The statistics are the same.

It stands aside (every batch runs whole) for a model without an output layer so
named, a PCA layer the first batch never reached (paths that depend on the
data), an output layer called before a PCA layer or more than once, a model
dispatched by accelerate (whose hooks expect each forward they start to end), or
a stop the model itself caught.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from torch import nn
from torch.utils.hooks import RemovableHandle

from ..layers.offload import dispatched
from ..layers.pca import PCALayer

__all__ = ["TailSkip"]


class _Stop(BaseException):
    """Raised as the output layer is about to run: the rest of the forward is not needed.

    A ``BaseException``, as ``KeyboardInterrupt`` is: a model's ``except Exception``
    clauses let it pass."""


class TailSkip:
    """Runs batches through ``model``, the first whole, the later ones up to its output layer.

    Args:
        model: the model calibration runs.
        watched: the modules whose calls feed the statistics, one per PCA layer: the
            layer, or the module whose inputs it collects instead (``layers.through``).
        enabled: False: every batch runs whole.
    """

    def __init__(self, model: nn.Module, watched: Iterable[nn.Module], enabled: bool = True):
        self._model = model
        self._watched = list(watched)
        self._counts = [0] * len(self._watched)
        self._reference: list[int] | None = None
        self._raised = False
        self._output = self._output_layer() if enabled else None
        self._live = self._output is not None and not dispatched(model)
        self._handles: list[RemovableHandle] = []

    def __enter__(self) -> TailSkip:
        if self._live:
            for i, module in enumerate(self._watched):
                self._handles.append(module.register_forward_pre_hook(self._counter(i)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _counter(self, i: int) -> Callable[..., None]:
        def count(module: nn.Module, args: Any) -> None:
            self._counts[i] += 1

        return count

    def run(self, run: Callable[[nn.Module, Any], Any], batch: Any) -> None:
        """``run(model, batch)``, stopped before the output layer where the rule allows."""
        if not self._live or self._output is None:
            run(self._model, batch)
            return
        self._counts[:] = [0] * len(self._counts)
        if self._reference is None:
            self._first(run, batch, self._output)
            return
        self._raised = False
        try:
            run(self._model, batch)
        except _Stop:
            return
        if self._raised:  # the model caught the stop and went on: run every batch whole
            self._stand_aside()

    def _first(self, run: Callable[[nn.Module, Any], Any], batch: Any, stop: nn.Module) -> None:
        """Run the first batch whole, recording where the output layer is called, and decide."""
        calls: list[nn.Module] = []

        def record(module: nn.Module, args: Any) -> None:
            calls.append(module)

        ids = {id(module) for module in self._watched}
        handles = [module.register_forward_pre_hook(record) for module in {stop, *self._watched}]
        try:
            run(self._model, batch)
        finally:
            for handle in handles:
                handle.remove()
        self._reference = list(self._counts)
        if (
            not all(self._reference)  # a layer this batch did not reach: paths vary
            or calls.count(stop) != 1
            or any(id(module) in ids for module in calls[calls.index(stop) :])
        ):
            self._stand_aside()
            return
        self._handles.append(stop.register_forward_pre_hook(self._stop_here))

    def _output_layer(self) -> nn.Module | None:
        """The model's output layer (``get_output_embeddings()``), where it holds no PCA layer
        and is not the model itself; else None."""
        method = getattr(self._model, "get_output_embeddings", None)
        if not callable(method):
            return None
        try:
            layer = method()
        except Exception:  # a model's own method, not meant for this: no output layer
            return None
        if (
            not isinstance(layer, nn.Module)
            or layer is self._model
            or any(isinstance(m, PCALayer) or m in self._watched for m in layer.modules())
        ):
            return None
        return layer

    def _stop_here(self, module: nn.Module, args: Any) -> None:
        if self._counts == self._reference:
            self._raised = True
            raise _Stop

    def _stand_aside(self) -> None:
        self._live = False
        self.__exit__()
