"""The lab's comparison table from training runs: markdown, CSV and a PNG plot.

    python scripts/compare.py runs/*/metrics.json --out report/

`--help` lists every flag.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a plain checkout

from jaxvision.apps.report import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
