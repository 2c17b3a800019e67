"""Makes the helpers shared by tests/unit and tests/e2e (tests/pki.py) importable by name."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
