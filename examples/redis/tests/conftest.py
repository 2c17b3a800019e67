"""
The example's tests run against its source tree (not a copy installed earlier): its
directory goes first on C{sys.path}, ahead of site-packages.
"""

from __future__ import annotations

import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parent.parent
if str(EXAMPLE) not in sys.path:
    sys.path.insert(0, str(EXAMPLE))
