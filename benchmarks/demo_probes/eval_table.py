"""The eval table's label, temporal and held-out rows of one or more eval.json files, side by side (for EXPERIMENTS.md).

python -m benchmarks.demo_probes.eval_table BEFORE/eval.json AFTER/eval.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

COLUMNS = ("pixels", "random_init", "student", "teacher")


def cell(figure: dict, key: str = "top1", scale: float = 100.0, digits: int = 1) -> str:
    if key not in figure:
        return "-"
    low, high = figure.get(f"{key}_interval") or (None, None)
    text = f"{scale * figure[key]:.{digits}f}"
    return text + (
        f" [{scale * low:.{max(0, digits - 1)}f},{scale * high:.{max(0, digits - 1)}f}]" if low is not None else ""
    )


def rows(report: dict) -> list[tuple[str, list[str]]]:
    out = []
    for probe in ("attentive", "linear"):
        out.append((f"SSv2 {probe} probe", [cell(report["classification"][probe].get(c, {})) for c in COLUMNS]))
    for task in report["summary"]["tasks"]:
        out.append((task.replace("_", " "), [cell(report["temporal"][task].get(c, {})) for c in COLUMNS]))
    heldout = [cell(report["heldout"].get(c, {}), "r2", 1.0, 3) for c in COLUMNS]
    out.append(("held-out R^2 per channel", heldout))
    return out


def main() -> None:
    reports = [json.loads(Path(path).read_text()) for path in sys.argv[1:]]
    print("| figure | " + " | ".join(f"{c} ({k + 1})" for k in range(len(reports)) for c in COLUMNS) + " |")
    print("| --- " * (1 + len(COLUMNS) * len(reports)) + "|")
    tables = [rows(r) for r in reports]
    for i, (name, _) in enumerate(tables[0]):
        print(f"| {name} | " + " | ".join(" | ".join(t[i][1]) for t in tables) + " |")


if __name__ == "__main__":
    main()
