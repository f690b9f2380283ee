"""The library's own exceptions: one family under :class:`PCASurgeryError`.

Argument checks raise the built-in ``ValueError``/``TypeError`` (see
``_validation``); these classes are for failures of pcasurgery's own work.
Each also derives from the built-in class that best describes it, so code
that catches the built-in class (``except RuntimeError``) keeps working.
"""

from __future__ import annotations

__all__ = [
    "NonFiniteError",
    "NotCalibratedError",
    "OnnxCheckError",
    "PCASurgeryError",
    "add_context",
]


class PCASurgeryError(Exception):
    """Base class of the exceptions pcasurgery raises for its own failures."""


class NotCalibratedError(PCASurgeryError, RuntimeError):
    """A PCA layer was asked for a projection or a report before it saw any data."""


class NonFiniteError(PCASurgeryError, ValueError):
    """Activations (or statistics) hold NaN or infinite values."""


class OnnxCheckError(PCASurgeryError):
    """The exported model's outputs in onnxruntime differ from PyTorch's."""


def add_context(err: BaseException, text: str) -> None:
    """Attach ``text`` to an exception raised by the user's model or data, keeping its type.

    The text shows under the traceback (``BaseException.add_note``, Python >= 3.11;
    on older Pythons the exception is left as it is).
    """
    add_note = getattr(err, "add_note", None)
    if add_note is not None:
        add_note(text)
