"""Convert a checkpoint's weights to the other framework.

    python scripts/convert_checkpoint.py runs/ckpt-cnn model.pth          # JAX -> torch state_dict
    python scripts/convert_checkpoint.py runs/ckpt-cnn-torch runs/ckpt-cnn-jax   # torch -> JAX

`jaxvision.apps.export` documents what is written.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a plain checkout

from jaxvision.apps.export import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
