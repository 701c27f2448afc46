"""`compare.py RUN...`: the lab's comparison report from training runs' metrics.json."""

from __future__ import annotations

import sys
from pathlib import Path

from jaxvision.core import flags
from jaxvision.core.errors import exit_code
from jaxvision.core.report import REPORT_FILES, load_runs, write_report
from jaxvision.core.results import probe_writable


def main(argv: list[str] | None = None) -> int:
    p = flags.Parser(
        prog="compare.py",
        description="Collect training runs (metrics.json) into the lab's comparison table "
        "(markdown, CSV) and a plot of accuracy against training time.",
    )
    p.add_argument("runs", nargs="*", help="metrics.json files, or run folders holding one")
    p.add_argument("--out", default="report", help="folder for comparison.md/.csv/.png [report]")
    args = p.parse_args(argv)

    def report():
        runs = load_runs(args.runs)
        probe_writable(Path(args.out), "--out", REPORT_FILES)
        paths = write_report(runs, Path(args.out))
        print(paths["md"].read_text(), end="")
        for path in paths.values():
            print(f"wrote {path}", file=sys.stderr)

    return exit_code(report)
