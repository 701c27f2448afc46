"""Train one of the lab's models and write metrics.json.

    python scripts/train.py --arch cnn --backend jax
    python scripts/train.py --arch cnn --backend torch --epochs 5 --optimizer sgd --lr 0.05

Prints a progress bar per epoch, a test-set line after each epoch, then the results row, and
writes runs/<arch>-<backend>-<timestamp>/metrics.json. `--help` lists every flag.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a plain checkout

from jaxvision.apps.train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
