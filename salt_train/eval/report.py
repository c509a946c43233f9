"""The evaluation's outputs: the printed table, ``eval/eval.json`` and ``eval/eval.png``.

The table has one row per figure and one column per model, references first
(random-init, student, teacher) with chance beside them, so a student reads
as a position between its lower and upper reference. The few-frame rows
(``eval.few_frames``) and the encoder's latency per clip come last.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from shared.errors import SaltUsageError, one_line
from shared.filesystem import atomic_file, write_json_atomic

log = logging.getLogger(__name__)

# The floor first, then the lower reference, the student, the upper reference.
COLUMNS = ("pixels", "random_init", "student", "teacher")
TITLES = {"pixels": "pixels", "random_init": "random-init", "student": "student", "teacher": "teacher"}
CELL = 21


def _cell(entry: Any, key: str) -> str:
    """``61.2 [52,70]`` (top-1 %, 95% interval) or ``0.455 [0.448,0.463]``; ``-`` where not run."""
    if not isinstance(entry, dict) or "not_run" in entry or entry.get(key) is None:
        return "-"
    value, bounds = entry[key], entry.get(f"{key}_interval")
    if key in ("top1", "top5"):
        text = f"{100 * value:.1f}"
        return text + (f" [{100 * bounds[0]:.0f},{100 * bounds[1]:.0f}]" if bounds else "")
    return f"{value:.3f}" + (f" [{bounds[0]:.3f},{bounds[1]:.3f}]" if bounds else "")


def table_rows(report: dict[str, Any]) -> list[tuple[str, str, list[str]]]:
    """(figure, floor, one cell per column) for every figure of the report. The floor is chance for a probe
    and the mean-latent baseline (no input) for the held-out figures."""
    rows = []
    heldout = report["heldout"]
    kind = next((v.get("loss_kind") for v in heldout.values() if "loss_kind" in v), "mse")
    base = heldout.get("mean_latent", {})
    rows.append(
        (
            f"held-out loss ({kind}, lower is better)",
            _cell(base, "loss").split(" ")[0],
            [_cell(heldout.get(c), "loss") for c in COLUMNS],
        )
    )
    rows.append(
        (
            "held-out R^2 per channel (higher is better)",
            _cell(base, "r2").split(" ")[0],
            [_cell(heldout.get(c), "r2") for c in COLUMNS],
        )
    )
    for name, task in report["temporal"].items():
        chance = f"{100 * task['chance']:.1f}%"
        label = f"{name.replace('_', ' ')}: {task['description']}" + (" [sanity]" if task.get("sanity_check") else "")
        rows.append((label, chance, [_cell(task.get(c), "top1") for c in COLUMNS]))
    summary = report.get("summary")
    if summary and summary.get("tasks"):
        rows.append(
            (
                f"temporal mean ({len(summary['tasks'])} probes, no sanity checks)",
                f"{100 * summary['chance']:.1f}%",
                [f"{100 * summary[c]:.1f}" if summary.get(c) is not None else "-" for c in COLUMNS],
            )
        )
    classification = report["classification"]
    if "skipped" in classification:
        rows.append((f"SSv2 classification: skipped ({classification['skipped']})", "", ["-"] * len(COLUMNS)))
    else:
        chance = f"{100 * classification['chance']:.1f}%"
        attentive = classification["attentive"]
        rows.append(("SSv2 attentive probe top-1", chance, [_cell(attentive.get(c), "top1") for c in COLUMNS]))
        if classification["classes"] > 5:
            rows.append(("SSv2 attentive probe top-5", "", [_cell(attentive.get(c), "top5") for c in COLUMNS]))
        rows.append(
            (
                "SSv2 linear probe (mean-pooled) top-1",
                chance,
                [_cell(classification["linear"].get(c), "top1") for c in COLUMNS],
            )
        )
    rows += few_frame_rows(report.get("few_frames", {}))
    latency = report.get("latency", {})
    if "frames" in latency:
        counts = sorted(latency["frames"], key=int)
        cells = ["-"] * len(COLUMNS)
        cells[COLUMNS.index("student")] = "/".join(_ms(latency["frames"][t]["median_ms"]) for t in counts)
        rows.append((f"encoder ms per clip at T={'/'.join(counts)} ({latency['device']}, batch 1, median)", "", cells))
    return rows


def few_frame_rows(few: dict[str, Any]) -> list[tuple[str, str, list[str]]]:
    """The few-frame rows (salt_train/eval/frames.py): per frame count, the SSv2 attentive probe and the
    temporal probes defined there."""
    rows = []
    for count, entry in sorted(few.get("frames", {}).items(), key=lambda item: int(item[0])):
        frames = f"{count} frames ({entry['frames'][0]}-{entry['frames'][-1]})"
        classification = entry["classification"]
        if "skipped" not in classification:
            rows.append(
                (
                    f"SSv2 attentive probe top-1, {frames}",
                    f"{100 * classification['chance']:.1f}%",
                    [_cell(classification["attentive"].get(c), "top1") for c in COLUMNS],
                )
            )
        for name, task in entry["temporal"].items():
            rows.append(
                (
                    f"{name.replace('_', ' ')}, {frames}",
                    f"{100 * task['chance']:.1f}%",
                    [_cell(task.get(c), "top1") for c in COLUMNS],
                )
            )
    return rows


def _ms(value: float) -> str:
    return f"{value:.2f}" if value < 10 else f"{value:.1f}" if value < 100 else f"{value:.0f}"


def print_table(report: dict[str, Any]) -> None:
    rows = table_rows(report)
    width = max(len(r[0]) for r in rows)
    header = f"{'figure':<{width}}  {'floor':>7}  " + "  ".join(f"{TITLES[c]:>{CELL}}" for c in COLUMNS)
    seeds = report.get("probe_seeds", [report["seed"]])
    print(
        f"== salt-train eval: {report['subject']['path']} ({report['subject']['source']}), "
        f"{len(report['rows']['train'])} train / {len(report['rows']['val'])} val rows, seed {report['seed']}, "
        f"probes: mean of {len(seeds)} seeds [95% interval over val rows and seeds]"
    )
    print(header)
    print("-" * len(header))
    for figure, floor, cells in rows:
        print(f"{figure:<{width}}  {floor:>7}  " + "  ".join(f"{cell:>{CELL}}" for cell in cells))
    notes = [f"{TITLES[c]}: {report['models'][c]}" for c in COLUMNS]
    notes.append(
        "floor: chance for a probe; for the held-out figures the mean-latent baseline, "
        + report["models"].get("mean_latent", "")
    )
    notes.append(
        "[sanity]: pixels pass it by construction; left out of the temporal mean. Overlapping intervals: "
        "no difference shown."
    )
    if "rule" in report.get("few_frames", {}):
        notes.append(f"T frames: {report['few_frames']['rule']}; the teacher takes 16 frames only")
    print("  " + "\n  ".join(notes))


def write_outputs(report: dict[str, Any], out_dir: Path, metrics: Path | None) -> None:
    """``eval.json`` (atomically; a failure is one line, exit 2) and ``eval.png`` (loss curve with eval points,
    probe bars; a failure there is a warning: eval.json holds every figure)."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out_dir / "eval.json", report)
    except OSError as exc:
        raise SaltUsageError(
            f"could not write {out_dir / 'eval.json'} ({one_line(exc)}); the table above holds the figures"
        ) from None
    try:
        write_plot(report, out_dir / "eval.png", metrics)
    except OSError as exc:
        log.warning("eval.png not written (%s); eval.json holds every figure", one_line(exc))


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
        curve.plot(*zip(*train, strict=False), label="training loss", color="tab:blue")
    evals = [
        (r["step"], r["eval"]["heldout_loss"])
        for r in records
        if isinstance(r.get("eval"), dict) and "heldout_loss" in r["eval"]
    ]
    if evals:
        curve.plot(*zip(*evals, strict=False), "o--", label="held-out loss (eval_every)", color="tab:orange")
    final = report["heldout"].get("student", {})
    if "loss" in final:
        step = train[-1][0] if train else 0
        curve.plot(
            [step], [final["loss"]], "D", color="tab:red", label=f"held-out loss, this eval ({final['loss']:.3f})"
        )
    random_loss = report["heldout"].get("random_init", {}).get("loss")
    if random_loss is not None:
        curve.axhline(random_loss, color="grey", linestyle=":", label=f"random-init held-out ({random_loss:.3f})")
    curve.set_xlabel("step")
    curve.set_ylabel("loss")
    curve.set_title("loss")
    if curve.get_legend_handles_labels()[0]:
        curve.legend(fontsize=8)

    probes = [
        (name + (" (sanity)" if task.get("sanity_check") else ""), task) for name, task in report["temporal"].items()
    ]
    classification = report["classification"]
    if "skipped" not in classification:
        probes += [
            ("ssv2_attentive", {**classification["attentive"], "chance": classification["chance"]}),
            ("ssv2_linear", {**classification["linear"], "chance": classification["chance"]}),
        ]
    width = 0.2
    colours = {"pixels": "tab:olive", "random_init": "tab:grey", "student": "tab:blue", "teacher": "tab:green"}
    for k, column in enumerate(COLUMNS):
        entries = [task.get(column, {}) for _, task in probes]
        values = [e.get("top1", 0.0) if "not_run" not in e else 0.0 for e in entries]
        bounds = [e.get("top1_interval", (v, v)) for v, e in zip(values, entries, strict=False)]
        errors = [
            [max(0.0, v - lo) for v, (lo, _) in zip(values, bounds, strict=False)],
            [max(0.0, hi - v) for v, (_, hi) in zip(values, bounds, strict=False)],
        ]
        bars.bar(
            [i + (k - 1.5) * width for i in range(len(probes))],
            values,
            width,
            label=TITLES[column],
            color=colours[column],
            yerr=errors,
            capsize=2,
            error_kw={"elinewidth": 0.8},
        )
    for i, (_, task) in enumerate(probes):
        bars.hlines(task["chance"], i - 2 * width, i + 2 * width, colors="black", linestyles="dashed")
    bars.set_xticks(range(len(probes)), [name.replace("_", "\n") for name, _ in probes], fontsize=8)
    bars.set_ylim(0, 1.05)
    bars.set_ylabel("top-1 accuracy (dashes: chance)")
    bars.set_title("probes, 95% intervals (missing bar: not run)")
    bars.legend(fontsize=8)
    figure.suptitle(f"salt-train eval: {Path(report['subject']['path']).name} ({report['subject']['source']})")
    figure.tight_layout()
    try:
        with atomic_file(path, unique=True) as partial:
            figure.savefig(partial, dpi=90, format="png")
    finally:
        plt.close(figure)
