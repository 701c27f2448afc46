"""The lab's comparison table, from training runs' metrics.json files: markdown, CSV and a plot.

    python scripts/compare.py runs/*/metrics.json --out report/

The table has the lab's columns (model, backend, dataset, accuracy, F1, loss, training time,
parameters) plus the device; the plot shows accuracy against training time (log axis), marker
area by parameter count, colour by backend, every point labelled.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from jaxvision.core.errors import UserError, writing
from jaxvision.core.results import data_label

COLUMNS = (
    "model",
    "backend",
    "dataset",
    "accuracy",
    "F1 (macro)",
    "loss",
    "training time (s)",
    "parameters",
    "device",
)
NEEDED = (
    "arch",
    "backend",
    "dataset",
    "test_accuracy",
    "test_f1_macro",
    "train_loss",
    "train_time_s",
    "params",
)
BACKEND_COLOURS = {"jax": "tab:blue", "torch": "tab:orange"}


def load_runs(paths: list[str | Path]) -> list[dict]:
    """Reads metrics.json files (or folders holding one); one-line errors name the file."""
    if not paths:
        raise UserError("no metrics.json given; pass files like runs/*/metrics.json")
    runs = []
    for p in map(Path, paths):
        path = p / "metrics.json" if p.is_dir() else p
        if path.exists() and not path.is_file():  # a pipe would wait forever, a device fill memory
            raise UserError(f"{path}: not a regular file; pass a metrics.json that train.py wrote")
        try:
            record = json.loads(path.read_text())
        except FileNotFoundError:
            if p.is_dir() and any(p.glob("*/metrics.json")):
                raise UserError(f"{p} holds no metrics.json, but its folders do; pass them: "
                                f"{p / '*'}") from None  # fmt: skip
            raise UserError(f"{path}: no such file") from None
        except (OSError, ValueError, RecursionError) as e:  # ValueError: JSON's and Unicode's
            raise UserError(f"{path}: not a readable metrics.json ({e})") from None
        if not isinstance(record, dict):
            raise UserError(f"{path}: not a metrics.json (a JSON object is expected)")
        missing = [k for k in NEEDED if k not in record]
        if missing:
            raise UserError(f"{path}: not a train.py metrics.json (missing {', '.join(missing)})")
        wrong = [k for k in (*NEEDED, *COUNTS, *TEXTS) if k in record and not _valid(k, record[k])]
        if ("n_train" in record) != ("n_test" in record):  # the table cell shows both
            wrong += [k for k in COUNTS if k not in record]
        if wrong:
            shown = ", ".join(f"{k}: {json.dumps(record[k]) if k in record else 'missing'}"
                              for k in wrong)  # fmt: skip
            raise UserError(f"{path}: a damaged metrics.json ({shown}); train that run again")
        record["_path"] = str(path)
        runs.append(record)
    return runs


COUNTS = ("n_train", "n_test")  # optional (older records lack them); a table cell when present
TEXTS = ("preset", "device", "host")  # optional; a string, or (preset) null


def _valid(key: str, value) -> bool:
    """Whether a NEEDED value has the type (and range) train.py writes."""
    if key in ("arch", "backend", "dataset"):
        return isinstance(value, str) and bool(value)
    if key in TEXTS:
        return isinstance(value, str) or (key == "preset" and value is None)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return False
    if key in ("params", *COUNTS):
        return isinstance(value, int) and value > 0
    if key == "train_time_s":  # a log axis: a time of 0 has no place on it
        return value > 0
    return value >= 0 and (value <= 1 or key not in ("test_accuracy", "test_f1_macro"))


def model_name(record: dict) -> str:
    preset = record.get("preset")
    return record["arch"] + (f" ({preset})" if preset else "")


def rows(runs: list[dict]) -> list[dict]:
    """One table row per run, sorted by model then backend."""
    out = []
    for r in sorted(runs, key=lambda r: (r["arch"], str(r.get("preset")), r["backend"])):
        out.append(
            {
                "model": model_name(r),
                "backend": r["backend"],
                "dataset": data_label(r),
                "accuracy": r["test_accuracy"],
                "F1 (macro)": r["test_f1_macro"],
                "loss": r["train_loss"],
                "training time (s)": r["train_time_s"],
                "parameters": r["params"],
                "device": r.get("device", ""),
            }
        )
    return out


def to_markdown(table: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|---" * len(COLUMNS) + "|"]
    for row in table:
        lines.append(
            f"| {row['model']} | {row['backend']} | {row['dataset']} | {row['accuracy']:.2%} "
            f"| {row['F1 (macro)']:.4f} | {row['loss']:.4f} | {row['training time (s)']:.1f} "
            f"| {row['parameters']:,} | {row['device']} |"
        )
    return "\n".join(lines)


def to_csv(table: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(table)
    return buf.getvalue()


def short_count(n: int) -> str:
    """139018 -> '139k', 57044810 -> '57M', 134301514 -> '134M'."""
    return f"{n / 1e6:.3g}M" if n >= 1e6 else f"{n / 1e3:.3g}k"


def plot(table: list[dict], path: Path, title: str = "") -> Path:
    """Accuracy against training time (log axis); area ~ parameters; colour = backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    biggest = max(row["parameters"] for row in table)
    for backend in dict.fromkeys(row["backend"] for row in table):
        pts = [row for row in table if row["backend"] == backend]
        ax.scatter(
            [row["training time (s)"] for row in pts],
            [100 * row["accuracy"] for row in pts],
            s=[30 + 900 * (row["parameters"] / biggest) ** 0.5 for row in pts],
            c=BACKEND_COLOURS.get(backend, "tab:green"),
            alpha=0.6,
            edgecolors="black",
            label=backend,
        )
        for row in pts:
            ax.annotate(
                f"{row['model']} ({short_count(row['parameters'])})",
                (row["training time (s)"], 100 * row["accuracy"]),
                textcoords="offset points",
                xytext=(6, 6),
                fontsize=8,
            )
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("training time (s, log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title or "accuracy against training time; marker area ~ parameters")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(title="backend", markerscale=0.5)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with writing(path):
        fig.savefig(path)
    plt.close(fig)
    return path


REPORT_FILES = ("comparison.md", "comparison.csv", "comparison.png")


def write_report(runs: list[dict], out_dir: Path, title: str = "") -> dict[str, Path]:
    """comparison.md, comparison.csv and comparison.png in `out_dir`; returns their paths."""
    table = rows(runs)
    out_dir.mkdir(parents=True, exist_ok=True)
    hosts = sorted({r.get("host", "") for r in runs} - {""})
    md = to_markdown(table)
    if hosts:
        md += "\n\nMeasured on " + "; ".join(hosts) + "."
    md_name, csv_name, png_name = REPORT_FILES
    paths = {"md": out_dir / md_name, "csv": out_dir / csv_name}
    with writing(paths["md"]):
        paths["md"].write_text(md + "\n")
    with writing(paths["csv"]):
        paths["csv"].write_text(to_csv(table))
    paths["png"] = plot(table, out_dir / png_name, title)
    return paths
