"""``python -m benchmarks``: every measure side by side with its anchor (see run_all.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from run_all import main  # noqa: E402

sys.exit(main())
