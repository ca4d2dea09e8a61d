"""Deprecated alias of :mod:`refusal_dir.testing.organism`, kept for one release.

Importing it warns (``DeprecationWarning``); import from ``refusal_dir.testing.organism``.
"""

from __future__ import annotations

import warnings

from refusal_dir.testing.organism import *  # noqa: F403
from refusal_dir.testing.organism import __all__  # noqa: F401

warnings.warn(
    "refusal_dir.organism moved to refusal_dir.testing.organism: import it from there "
    "(the old path goes in the next release)",
    DeprecationWarning,
    stacklevel=2,
)
