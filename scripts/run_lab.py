"""The lab, reproduced: every arch in both backends (CPU-sized), then the comparison report.

    python scripts/run_lab.py            # writes runs/lab-<time>/comparison.{md,csv,png}
    python scripts/run_lab.py --dry-run  # the training commands it would run

`--help` lists every flag.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a plain checkout

from jaxvision.apps.lab import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
