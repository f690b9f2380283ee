"""The seed library's ``writers`` module."""

from .tracking.writers import *  # noqa: F403 - the same names, under the seed's path
from .tracking.writers import __all__  # noqa: F401
