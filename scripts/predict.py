"""Classify image files with a trained checkpoint.

    python scripts/predict.py --checkpoint runs/ckpt-cnn digit.png photo.jpg
    python scripts/predict.py --checkpoint runs/ckpt-cnn --json *.png

PNG or JPG, any size, colour or grey, dark ink on light paper or light on dark: each image is
fitted to the training data's form (`jaxvision.core.images` documents how). Prints the class and
its probability per file; a file that cannot be read gets one error line and the rest are still
classified (exit code 1 if any failed).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a plain checkout

from jaxvision.apps.predict import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
