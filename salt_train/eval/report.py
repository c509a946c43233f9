"""The evaluation's outputs: the printed table, ``eval/eval.json`` and ``eval/eval.png``.

The table has one row per figure and one column per model, references first
(random-init, student, teacher) with chance beside them, so a student reads
as a position between its lower and upper reference.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from shared.filesystem import atomic_file, write_json_atomic

COLUMNS = ("random_init", "student", "teacher")
TITLES = {"random_init": "random-init", "student": "student", "teacher": "teacher"}


def _cell(entry: Any, key: str) -> str:
    if not isinstance(entry, dict) or "not_run" in entry or entry.get(key) is None:
        return "-"
    value = entry[key]
    return f"{100 * value:.1f}%" if key in ("top1", "top5") else f"{value:.4f}"


def table_rows(report: dict[str, Any]) -> list[tuple[str, str, list[str]]]:
    """(figure, chance, one cell per column) for every figure of the report."""
    rows = []
    heldout = report["heldout"]
    kind = next((v.get("loss_kind") for v in heldout.values() if "loss_kind" in v), "mse")
    rows.append((f"held-out loss ({kind}, lower is better)", "", [_cell(heldout[c], "loss") for c in COLUMNS]))
    rows.append(("held-out R^2 (higher is better)", "", [_cell(heldout[c], "r2") for c in COLUMNS]))
    for name, task in report["temporal"].items():
        chance = f"{100 * task['chance']:.1f}%"
        rows.append((f"{name.replace('_', ' ')}: {task['description']}", chance,
                     [_cell(task.get(c), "top1") for c in COLUMNS]))
    classification = report["classification"]
    if "skipped" in classification:
        rows.append((f"SSv2 classification: skipped ({classification['skipped']})", "", ["-"] * len(COLUMNS)))
    else:
        chance = f"{100 * classification['chance']:.1f}%"
        attentive = classification["attentive"]
        rows.append(("SSv2 attentive probe top-1", chance, [_cell(attentive[c], "top1") for c in COLUMNS]))
        if classification["classes"] > 5:
            rows.append(("SSv2 attentive probe top-5", "", [_cell(attentive[c], "top5") for c in COLUMNS]))
        rows.append(("SSv2 linear probe (mean-pooled) top-1", chance,
                     [_cell(classification["linear"][c], "top1") for c in COLUMNS]))
    return rows


def print_table(report: dict[str, Any]) -> None:
    rows = table_rows(report)
    width = max(len(r[0]) for r in rows)
    header = f"{'figure':<{width}}  {'chance':>7}  " + "  ".join(f"{TITLES[c]:>11}" for c in COLUMNS)
    print(f"== salt-train eval: {report['subject']['path']} ({report['subject']['source']}), "
          f"{len(report['rows']['train'])} train / {len(report['rows']['val'])} val rows, seed {report['seed']}")
    print(header)
    print("-" * len(header))
    for figure, chance, cells in rows:
        print(f"{figure:<{width}}  {chance:>7}  " + "  ".join(f"{cell:>11}" for cell in cells))
    notes = [f"{TITLES[c]}: {report['models'][c]}" for c in COLUMNS]
    print("  " + "\n  ".join(notes))


def write_outputs(report: dict[str, Any], out_dir: Path, metrics: Path | None) -> None:
    """``eval.json`` (atomically) and ``eval.png`` (loss curve with eval points, probe bars)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / "eval.json", report)
    write_plot(report, out_dir / "eval.png", metrics)


def _read_metrics(path: Path | None) -> list[dict[str, Any]]:
    if path is None or not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill: the rest still plots
            continue
    return records


def write_plot(report: dict[str, Any], path: Path, metrics: Path | None) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    records = _read_metrics(metrics)
    figure, (curve, bars) = plt.subplots(1, 2, figsize=(14, 5), gridspec_kw={"width_ratios": [1, 1.6]})
    train = [(r["step"], r["loss"]) for r in records if "loss" in r and "eval" not in r]
    if train:
        curve.plot(*zip(*train), label="training loss", color="tab:blue")
    evals = [(r["step"], r["eval"]["heldout_loss"]) for r in records if isinstance(r.get("eval"), dict)
             and "heldout_loss" in r["eval"]]
    if evals:
        curve.plot(*zip(*evals), "o--", label="held-out loss (eval_every)", color="tab:orange")
    final = report["heldout"].get("student", {})
    if "loss" in final:
        step = train[-1][0] if train else 0
        curve.plot([step], [final["loss"]], "D", color="tab:red",
                   label=f"held-out loss, this eval ({final['loss']:.3f})")
    random_loss = report["heldout"].get("random_init", {}).get("loss")
    if random_loss is not None:
        curve.axhline(random_loss, color="grey", linestyle=":", label=f"random-init held-out ({random_loss:.3f})")
    curve.set_xlabel("step")
    curve.set_ylabel("loss")
    curve.set_title("loss")
    if curve.get_legend_handles_labels()[0]:
        curve.legend(fontsize=8)

    probes = [(name, task) for name, task in report["temporal"].items()]
    classification = report["classification"]
    if "skipped" not in classification:
        probes += [("ssv2_attentive", {**classification["attentive"], "chance": classification["chance"]}),
                   ("ssv2_linear", {**classification["linear"], "chance": classification["chance"]})]
    width = 0.26
    colours = {"random_init": "tab:grey", "student": "tab:blue", "teacher": "tab:green"}
    for k, column in enumerate(COLUMNS):
        values = [task.get(column, {}).get("top1", 0.0) if "not_run" not in task.get(column, {}) else 0.0
                  for _, task in probes]
        bars.bar([i + (k - 1) * width for i in range(len(probes))], values, width, label=TITLES[column],
                 color=colours[column])
    for i, (_, task) in enumerate(probes):
        bars.hlines(task["chance"], i - 1.5 * width, i + 1.5 * width, colors="black", linestyles="dashed")
    bars.set_xticks(range(len(probes)), [name.replace("_", "\n") for name, _ in probes], fontsize=8)
    bars.set_ylim(0, 1.05)
    bars.set_ylabel("top-1 accuracy (dashes: chance)")
    bars.set_title("probes (missing bar: not run)")
    bars.legend(fontsize=8)
    figure.suptitle(f"salt-train eval: {Path(report['subject']['path']).name} ({report['subject']['source']})")
    figure.tight_layout()
    try:
        with atomic_file(path, unique=True) as partial:
            figure.savefig(partial, dpi=90, format="png")
    finally:
        plt.close(figure)
