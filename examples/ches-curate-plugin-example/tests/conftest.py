"""Import the example package from its source folder, installed or not (ches-curate's own suite runs these tests)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
