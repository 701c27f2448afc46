"""Cross-framework speed: training and inference throughput per arch and backend, side by side.

    python scripts/benchmark.py                                  # cnn, vit x jax, torch
    python scripts/benchmark.py --backends jax,torch,torch-compile --json bench.json

Prints a markdown table and the JAX / PyTorch ratios; `--help` lists every flag.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a plain checkout

from jaxvision.apps.benchmark import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
