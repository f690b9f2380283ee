"""A PCA layer's declared state: its buffers, their persistence, and its snapshot.

Every buffer a PCA layer holds is declared once, in :data:`STATE` (name, shape,
dtype, whether it is a statistic, how processes combine it, whether its shape
follows ``k``, and whether it is a view of another buffer); the attributes
outside the buffers that calibration must save and restore are declared in
:data:`HOST_STATE`. :class:`LayerState` builds the buffers from the table and
owns everything that reads the table: installing a buffer (:meth:`LayerState._put`),
the host-side mirrors that keep forwards free of device syncs, device moves and
dtype casts (the statistics stay float64), ``state_dict`` in both directions (a
view saved as a tensor of its own; a checkpoint's shapes taken on load; the
seed library's checkpoints converted, ``layers.seed_state``), and
:meth:`LayerState.snapshot` / :meth:`LayerState.restore`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .._validation import check_bool, check_positive_int, check_threshold
from ..core import moments as _m
from .seed_state import convert_delve_state

__all__ = [
    "HOST_STATE",
    "MOMENTS",
    "STATE",
    "SUMMED",
    "LayerSnapshot",
    "LayerState",
    "SquareFactors",
    "version_tokens",
]


@dataclass(frozen=True)
class StateSpec:
    """One buffer of a PCA layer, declared once.

    Attributes:
        name: the buffer's name (its ``state_dict`` key).
        shape: ``shape(width, keepdim)``, its shape when the layer is built.
        dtype: its dtype, which casts such as ``.half()`` never change; None for
            the projection, which follows the module's floating dtype.
        statistic: part of the collected statistics: cleared by
            ``reset_statistics``, collected afresh by each calibration.
        reduce: how processes combine it: ``"moments"`` (the four fields of
            ``core.moments.Moments``, summed exactly around a common shift by
            ``all_reduce_moments``), ``"sum"`` (added), or None (kept per process).
        resizable: its shape depends on ``k`` or on whether there is data yet (the
            squares are allocated when first needed); a checkpoint's shape is
            taken on load.
        initial: the value it starts from (and returns to on reset).
        optional: added after checkpoints were first written; a checkpoint
            without it loads, keeping the initial value.
        view_of: the buffer whose leading columns it may be, a strided view that
            shares their storage (the basis: the kept eigenvectors, not a second
            copy of them) and is sliced again after a move to another device; a
            checkpoint is loaded into a buffer of its own, never through the view.
    """

    name: str
    shape: Callable[[int, bool], tuple[int, ...]]
    dtype: torch.dtype | None
    statistic: bool = False
    reduce: str | None = None
    resizable: bool = False
    initial: float = 0
    optional: bool = False
    view_of: str | None = None


def _scalar(width: int, keepdim: bool) -> tuple[int, ...]:
    return ()


def _vector(width: int, keepdim: bool) -> tuple[int, ...]:
    return (width,)


def _unallocated(width: int, keepdim: bool) -> tuple[int, ...]:
    return (0, 0)  # (width, width) once the first batch arrives (PCALayer._allocate_statistics)


_F64, _I64 = torch.float64, torch.int64
STATE: tuple[StateSpec, ...] = (
    # the moments (core.moments.Moments) and the examples they came from
    StateSpec("sample_count", _scalar, _I64, statistic=True, reduce="moments"),
    StateSpec("shift", _vector, _F64, statistic=True, reduce="moments"),
    StateSpec("shifted_sum", _vector, _F64, statistic=True, reduce="moments"),
    StateSpec(
        "shifted_sum_sq", _unallocated, _F64, statistic=True, reduce="moments", resizable=True
    ),
    StateSpec("example_count", _scalar, _I64, statistic=True, reduce="sum"),
    # samples per input example in the last batch (h*w for convs, tokens for Linear)
    StateSpec("sample_positions", _scalar, _I64, statistic=True, initial=1),
    # the statistics are already the union over a process group (a distributed calibration)
    StateSpec("statistics_shared", _scalar, torch.bool, statistic=True, optional=True),
    # sample_count when the spectrum was computed: 0 = never, -1 = from other statistics
    StateSpec("computed_count", _scalar, _I64),
    StateSpec("_threshold", _scalar, _F64),
    StateSpec("_centering", _scalar, torch.bool),
    StateSpec("_keepdim", _scalar, torch.bool, optional=True),
    StateSpec("eigenvalues", _vector, _F64),
    # the eigenvectors computed so far, leading first: all of them, or those of the
    # non-zero eigenvalues when the spectrum came from a layer's input (layers.through)
    StateSpec("eigenvectors", lambda w, keep: (w, 0), _F64, resizable=True),
    StateSpec("mean", _vector, _F64),
    StateSpec("rank", _scalar, _I64),
    StateSpec("random_directions", _scalar, torch.bool),
    # eigenvalues installed, eigenvectors and projection not computed yet (a calibration
    # decomposes for the spectrum only; the vectors come at their first use)
    StateSpec("vectors_pending", _scalar, torch.bool, optional=True),
    # the affine map of the projection (V V^T, or V^T where that is smaller: see
    # PCALayer._factored), and the (width, k) basis it keeps
    StateSpec("projection_weight", lambda w, keep: (0, w), None, resizable=True),
    StateSpec("projection_bias", lambda w, keep: (0,), None, resizable=True),
    StateSpec("basis", lambda w, keep: (w, 0), _F64, resizable=True, view_of="eigenvectors"),
)
SPEC = {spec.name: spec for spec in STATE}
MOMENTS = tuple(s.name for s in STATE if s.reduce == "moments")  # Moments' field order
SUMMED = tuple(s.name for s in STATE if s.reduce == "sum")
assert MOMENTS == ("sample_count", "shift", "shifted_sum", "shifted_sum_sq")

# The buffers a spectrum installed as its eigenvalues only does not have yet
_WITH_VECTORS = frozenset({"eigenvectors", "basis", "projection_weight", "projection_bias"})

# The attributes outside the buffers that are part of a layer's state: its mode, the
# seed's epoch counter, a square held as its factors, the span of a spectrum computed
# through the followed module's input, and whether the model was seen to call the
# followed Linear with another bias, the samples themselves while there are few
# (see LayerState's class attributes).
HOST_STATE = ("_mode", "epoch", "_square_factors", "_spans", "_other_bias", "_rows")


class SquareFactors(NamedTuple):
    """A layer's statistics' square held as its factors ``W S W^T``: a widening module's
    output statistics collected on its input (``layers.through``).

    Attributes:
        weight: ``W``, ``(out, in)``, a copy of the module's map as it held it.
        bias: the module's bias ``(out,)``, or None where it has none.
        inputs: the moments of the module's input; ``inputs.total_sq`` is ``S``.
        module: the module's own ``(weight, bias)`` tensors and their
            :func:`version_tokens` when the factors were taken: eigenvectors computed
            from the factors span the range of that map while the tokens stay the same.
        cache: what the eigenvalues leave to the eigenvectors' first use (the
            ``cache`` of ``core.spectrum.eigh_through``); emptied once they are computed.
    """

    weight: Tensor
    bias: Tensor | None
    inputs: _m.Moments
    module: tuple[tuple[Tensor | None, ...], tuple]
    cache: dict[str, Any]

    def to(self, device: torch.device) -> SquareFactors:
        """The factors on ``device`` (the module's own tensors stay referenced as they are)."""
        bias = None if self.bias is None else self.bias.to(device)
        inputs = _m.Moments(*(t.to(device) for t in self.inputs))
        return self._replace(weight=self.weight.to(device), bias=bias, inputs=inputs, cache={})


@dataclass(frozen=True)
class LayerSnapshot:
    """A layer's whole state, by reference: its buffers and :data:`HOST_STATE`.

    Buffers are replaced, never changed in place (except the statistics while a
    batch is added, into buffers a snapshot no longer holds), so references are
    a complete copy.
    """

    buffers: dict[str, Tensor]
    host: dict[str, Any] = field(default_factory=dict)

    @property
    def mode(self) -> str:
        return self.host["_mode"]

    @property
    def shared(self) -> bool:
        """Whether the statistics were already the union over a process group."""
        return bool(self.buffers["statistics_shared"])

    @property
    def rows(self) -> int:
        return int(self.buffers["sample_count"])

    @property
    def positions(self) -> int:
        return int(self.buffers["sample_positions"])

    def moments(self, device: torch.device | None = None) -> _m.Moments:
        """The statistics' moments (the square formed: see ``LayerState.snapshot``)."""
        return _m.Moments(*(self.buffers[name].to(device) for name in MOMENTS))

    def summed(self) -> dict[str, int]:
        """The buffers processes add up (``reduce="sum"``)."""
        return {name: int(self.buffers[name]) for name in SUMMED}


class LayerState(nn.Module):
    """The declared state of a PCA layer (see the module docstring).

    Host-side mirrors of the sample counts, the scalar settings and the rank
    keep the forward and their reads free of device syncs; they are derived
    from the buffers in one place (:meth:`_sync_flags`).
    """

    name: str
    # the statistics' square held as its factors ``W S W^T`` (a widening layer
    # calibrated on its input, layers.through): the square is formed the first time
    # anything reads it (``statistics()``, the buffer, the state dict, more data), so
    # that calibration and the spectrum (eigenvalues, then eigenvectors at their first
    # use, both from the ``in``-wide problem) never need it
    _square_factors: SquareFactors | None = None
    # the samples themselves, float64 ``(rows, width)`` blocks, while there are at most
    # ``ROWS_FRACTION`` of the width of them (layers.statistics): the moments hold
    # their count and sum around a zero shift, and the square is formed (around their
    # mean) only if something reads it or more samples arrive; the spectrum comes
    # from the rows (core.spectrum.pca_of_rows), a problem as wide as the samples
    _rows: tuple[Tensor, ...] | None = None
    # ``((eigenvectors, weight, bias), their tokens)`` where the computed eigenvectors,
    # fewer than the width, span the range of the followed module's map as it was
    # when they were computed (layers.through); see ``discarded_directions``. Cleared
    # when the spectrum is installed; a weight replaced since stays referenced until then.
    _spans: tuple[tuple, tuple] | None = None
    # the model calls ``F.linear`` on the followed module's weight with a bias of its own
    # making (Swin V2's key), learned on a forward (layers.sites.FollowedWeight): the
    # projection cannot be folded into that module, and compress keeps it as it is
    _other_bias: bool = False

    # The buffers of STATE, for type checkers (nn.Module resolves them at run time).
    sample_count: Tensor
    shift: Tensor
    shifted_sum: Tensor
    shifted_sum_sq: Tensor
    example_count: Tensor
    sample_positions: Tensor
    statistics_shared: Tensor
    computed_count: Tensor
    _threshold: Tensor
    _centering: Tensor
    _keepdim: Tensor
    eigenvalues: Tensor
    eigenvectors: Tensor
    mean: Tensor
    rank: Tensor
    random_directions: Tensor
    projection_weight: Tensor
    projection_bias: Tensor
    basis: Tensor
    vectors_pending: Tensor

    def __init__(
        self, width: int, threshold: float, keepdim: bool, centering: bool, width_name: str
    ):
        super().__init__()
        width = check_positive_int(width, width_name)
        threshold = check_threshold(threshold)
        check_bool(keepdim, "keepdim")
        check_bool(centering, "centering")
        self.width: int = width
        self.epoch = 0
        self._mode = "auto"
        for spec in STATE:
            shape = spec.shape(width, keepdim)
            dtype = spec.dtype or torch.get_default_dtype()
            self.register_buffer(spec.name, torch.full(shape, spec.initial, dtype=dtype))
        self._put("_threshold", threshold)
        self._put("_centering", centering)
        self._put("_keepdim", keepdim)
        self._sync_flags()

    def _put(self, name: str, value: Tensor | float | bool) -> None:
        """Install a new tensor as buffer ``name``, in its declared dtype, on the layer's device.

        Contiguous, except for a buffer declared a view of another (``view_of``),
        which keeps the strides it is given (a slice of that buffer stays a slice).
        It shares memory with no other buffer (a tensor that does is copied): a
        state dict of tensors that share memory is refused by safetensors, and so
        by ``save_pretrained``.
        """
        current = self._buffers[name]
        assert current is not None
        spec = SPEC[name]
        dtype = spec.dtype or current.dtype
        with torch.inference_mode(False):
            if not isinstance(value, Tensor):  # filled where it lives: no host-to-device copy
                value = torch.full((), value, dtype=dtype, device=current.device)
            value = value.to(device=current.device, dtype=dtype)
            if value.is_inference() or self._aliases(value, spec):
                value = value.clone()
            self._buffers[name] = value if spec.view_of else value.contiguous()

    def _aliases(self, value: Tensor, spec: StateSpec) -> bool:
        """Whether ``value`` shares memory with a buffer, other than the one ``spec``
        declares it a view of (and its own view of that one)."""
        ptr = value.untyped_storage().data_ptr()
        allowed = (spec.view_of, spec.name) if spec.view_of else ()
        return bool(ptr) and any(
            other is not None and name not in allowed and other.untyped_storage().data_ptr() == ptr
            for name, other in self._buffers.items()
        )

    def _sync_flags(self) -> None:
        """Derive the host-side mirrors from the buffers (one device sync)."""
        flags = torch.stack(
            [
                t.to(_F64)
                for t in (
                    self.sample_count,
                    self.computed_count,
                    self.shift.any(),
                    self._keepdim,
                    self._threshold,
                    self._centering,
                    self.rank,
                    self.vectors_pending,
                )
            ]
        ).tolist()
        self._n, self._computed = int(flags[0]), int(flags[1])
        self._subtract, self._keepdim_host = bool(flags[2]), bool(flags[3])
        self._threshold_host, self._centering_host = flags[4], bool(flags[5])
        self._rank_host = int(flags[6])
        self._pending = bool(flags[7])

    @property
    def _empty(self) -> bool:
        return self._n == 0

    @property
    def _has_spectrum(self) -> bool:
        return self._computed != 0

    @property
    def _stale(self) -> bool:
        return self._n > 0 and self._n != self._computed

    def _held_moments(self) -> _m.Moments:
        """The moment buffers as they are: the square may still be unformed (``(0, 0)``)."""
        return _m.Moments(*(self._buffers[name] for name in MOMENTS))  # type: ignore[arg-type]

    def _form_square(self) -> None:
        """Form the square from its factors or the rows, if it is held that way (see
        ``_square_factors`` and ``_rows``)."""
        if self._rows is not None:
            with torch.inference_mode(False):
                moments = _m.moments_of_rows(self._held_rows())
                for name, value in zip(MOMENTS, moments, strict=True):
                    self._buffers[name] = value
            self._rows = None
            self._subtract = True
        factors = self._square_factors
        if factors is not None:
            with torch.inference_mode(False):
                self._buffers["shifted_sum_sq"] = _m.mapped_square(
                    factors.weight, factors.inputs.total_sq
                )
            self._square_factors = None

    def _held_rows(self) -> Tensor:
        """The samples held as rows, in one ``(rows, width)`` matrix (kept so)."""
        assert self._rows is not None
        if len(self._rows) != 1:
            self._rows = (torch.cat(self._rows),)
        return self._rows[0]

    def __getattr__(self, name: str) -> Any:
        if name == "shifted_sum_sq":
            self._form_square()
        elif name in _WITH_VECTORS and self.__dict__.get("_pending"):
            self._vectors_wanted()  # their first read after a calibration computes them
        return super().__getattr__(name)

    def _vectors_wanted(self) -> None:
        """Compute eigenvectors installed as pending (``PCALayer.compute_eigenvectors``)."""

    @property
    def other_bias(self) -> bool:
        """Whether the model calls the followed Linear through ``F.linear`` with another bias."""
        return self._other_bias

    def note_other_bias(self) -> None:
        """Record that the model calls the followed Linear with a bias of its own making."""
        self._other_bias = True

    @property
    def keepdim(self) -> bool:
        """Whether the output keeps the layer's width (fixed when the layer is built)."""
        return self._keepdim_host

    # --------------------------------------------------------------- snapshot
    def snapshot(self, *, complete: bool = False) -> LayerSnapshot:
        """The layer's whole state, by reference (nothing is copied).

        ``complete``: form a square held as its factors first, so that the
        snapshot's moments can be merged with others (a calibration that adds
        to the statistics).
        """
        if complete:
            self._form_square()
        host = {
            name: self.__dict__.get(name, getattr(type(self), name, None)) for name in HOST_STATE
        }
        return LayerSnapshot(dict(self._buffers), host)  # type: ignore[arg-type]

    def restore(self, snapshot: LayerSnapshot) -> None:
        """Put back the state of :meth:`snapshot`."""
        self._buffers.clear()
        self._buffers.update(snapshot.buffers)
        for name, value in snapshot.host.items():
            self.__dict__[name] = value
        self._sync_flags()

    # ------------------------------------------------------------ persistence
    def _apply(self, fn, recurse=True):
        # Module.half()/float()/to(dtype) would cast the float64 statistics; keep
        # every buffer in its declared dtype and only follow the device (a square
        # held as its factors too).
        keep = {s.name: self._buffers[s.name] for s in STATE if s.dtype is not None}
        views = {
            s.name: _leading_columns(self._buffers[s.name], self._buffers[s.view_of])
            for s in STATE
            if s.view_of
        }
        super()._apply(fn, recurse)
        device = self._buffers["shift"].device  # (raw: reading the projection could compute it)
        for name, value in keep.items():
            if value is not None:
                self._buffers[name] = value.to(device)
        for name, k in views.items():  # still a view, not a copy, on the new device
            base = self._buffers[str(SPEC[name].view_of)]
            if k is not None and base is not None:
                self._buffers[name] = base[:, :k]
        if self._square_factors is not None:
            self._square_factors = self._square_factors.to(device)
        if self._rows is not None:
            self._rows = tuple(rows.to(device) for rows in self._rows)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self._form_square()
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for spec in STATE:  # a tensor of its own (a full-rank view is its whole base):
            if spec.view_of and prefix + spec.name in destination:  # safetensors refuses shared
                destination[prefix + spec.name] = destination[prefix + spec.name].clone(
                    memory_format=torch.contiguous_format
                )

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        if prefix + "sum_squares" in state_dict and prefix + "shifted_sum_sq" not in state_dict:
            convert_delve_state(self, state_dict, prefix)
        incoming_keepdim = state_dict.get(prefix + "_keepdim")
        weight = state_dict.get(prefix + "projection_weight")
        if isinstance(incoming_keepdim, Tensor):
            theirs = bool(incoming_keepdim)
        elif isinstance(weight, Tensor) and weight.dim() == 2 and weight.shape[0] != self.width:
            theirs = False  # a checkpoint from before keepdim was stored: read it off the shape
        else:
            theirs = self.keepdim
        if theirs != self.keepdim:
            error_msgs.append(
                f"{prefix or 'PCA layer '}: the checkpoint was saved with keepdim={theirs}, this "
                f"layer has keepdim={self.keepdim} (its outputs would change shape); build the "
                f"layer with keepdim={theirs} to load it"
            )
            return
        for spec in STATE:
            incoming = state_dict.get(prefix + spec.name)
            current = self._buffers[spec.name]
            if spec.resizable and isinstance(incoming, Tensor) and current is not None:
                if incoming.shape != current.shape or spec.view_of:  # never through a view
                    self._buffers[spec.name] = current.new_empty(incoming.shape)
        if prefix + "shifted_sum_sq" in state_dict:
            self._square_factors = None  # the square comes from the checkpoint
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        for spec in STATE:  # checkpoints written before these buffers existed
            if spec.optional and prefix + spec.name in missing_keys:
                missing_keys.remove(prefix + spec.name)
        self._sync_flags()


def _leading_columns(view: Tensor | None, base: Tensor | None) -> int | None:
    """``k`` where ``view`` is ``base[:, :k]`` (the same storage, offset and strides), else None."""
    if view is None or base is None or view.dim() != 2 or base.dim() != 2 or not view.numel():
        return None
    same = (
        view.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()
        and view.storage_offset() == base.storage_offset()
        and view.stride() == base.stride()
        and view.shape[0] == base.shape[0]
        and view.shape[1] <= base.shape[1]
    )
    return view.shape[1] if same else None


def version_tokens(tensors: Iterable[Tensor | None]) -> tuple:
    """What changes when a tensor is modified in place, moved or given new data."""
    return tuple(
        None if t is None else (t._version, t.data_ptr(), t.dtype, t.device) for t in tensors
    )
