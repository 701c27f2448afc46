"""Score a trained checkpoint on a test set, without training.

    python scripts/evaluate.py --checkpoint runs/ckpt-cnn                # MNIST's official test set
    python scripts/evaluate.py --checkpoint runs/ckpt-cnn --data-source idx --data-dir ~/data

Prints accuracy, macro F1 and loss, and writes metrics.json (with the confusion matrix),
confusion.png and mistakes.png to --out. `--help` lists every flag.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a plain checkout

from jaxvision.apps.evaluate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
