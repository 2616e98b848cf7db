"""Small types shared across simgap; a leaf module (imports nothing of the project)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeAlias

Log: TypeAlias = Callable[[str], None]
"""Where a function reports progress: one line of text per call (``print``, a logger, a console)."""
