"""`make gpu-check`: every figure a lent GPU should give, from one command, within 9 minutes.

Each step is a subprocess with its own deadline: the smaller of its cap and what is left of the budget.
A step that fails or runs out of time is recorded as such (its log kept) and the next one runs; a step
whose input failed is skipped with the reason. The steps reuse the project's commands and benches
(``salt-cache bench --json``, ``salt-train bench --json --profile``, ``salt-train eval``):

device and its bf16 matmul rate -> demo clips -> two small stores for the eval -> teacher-only and
end-to-end build rates (ViT-H, random weights, production geometry) -> the ViT-B step from memory and
from the loader, random-0.75 and multiblock, compile ``default`` (multiblock also profiled: top kernels,
busy fraction) -> the fast eval's wall time by phase -> with the time left: ``max-autotune`` steps, the
teacher at batch 32, with cuDNN attention and with ``max-autotune``.

Writes into ``--out``: ``gpu-check.json`` (every figure a ``{"value", "unit"}`` pair; rewritten after
each step, so a killed check keeps the steps it finished), ``summary.md``, and ``steps/`` (each step's
log and its bench's own JSON). ``--dry``: the same steps on CPU at tiny sizes (tiny teacher, the demo
recipe's student, a few clips; compile modes are CUDA-only and skipped), to test the check itself.

The one module that imports both salt_cache and salt_train (the packages never import each other).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: this tree's packages
    sys.path.insert(0, str(ROOT))

from shared import parent_death  # noqa: E402
from shared.config import HUGE_RANDOM_TEACHER, TINY_TEACHER, dump_pipeline, load_pipeline  # noqa: E402
from shared.errors import EXIT_OK, EXIT_USAGE, SaltUsageError  # noqa: E402
from shared.filesystem import write_json_atomic, write_text_atomic  # noqa: E402

FORMAT, VERSION = "salt-gpu-check", 1
MARKER = ".gpu-check"  # an --out folder holding it is ours to clear
RESULT, SUMMARY = "gpu-check.json", "summary.md"

# A figure's unit from the end of its name (the benches' --json names carry it), longest first.
UNIT_SUFFIXES = (
    ("_clips_per_s", "clips/s"),
    ("_tflop_per_s", "TFLOP/s"),
    ("_tflops", "TFLOP/s"),
    ("_tflop_per_clip", "TFLOP/clip"),
    ("_gflop_per_clip", "GFLOP/clip"),
    ("_ms_per_clip", "ms/clip"),
    ("_ms_per_step", "ms/step"),
    ("_mb_per_s", "MB/s"),
    ("_bytes_per_clip", "bytes/clip"),
    ("_bytes", "bytes"),
    ("_fraction", "fraction"),
    ("_count", "count"),
    ("_clips", "clips"),
    ("_s", "s"),
)
BARE_UNITS = {"processes": "count", "threads": "count", "batch": "clips"}  # salt-train bench's older names


def unit_of(name: str) -> str:
    if name in BARE_UNITS:
        return BARE_UNITS[name]
    for suffix, unit in UNIT_SUFFIXES:
        if name.endswith(suffix) or name == suffix[1:]:
            return unit
    raise ValueError(f"figure {name!r} has no unit in its name")


def with_units(numbers: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{name: number}`` -> ``{name: {"value": number, "unit": ...}}`` (None: not measured here)."""
    return {name: {"value": value, "unit": unit_of(name)} for name, value in numbers.items()}


# ---- sizes ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    """How big each step is: production geometry on a GPU, tiny on CPU (``--dry``)."""

    dry: bool
    budget_s: float  # the whole check
    min_step_s: float  # a step is not started with less left
    device: str
    base_recipe: str
    bench_teacher: str
    bench_clips: int
    teacher_batch: int
    decode_workers: int
    train_clips: int
    val_clips: int
    step_batches: int
    synthetic_rows: int | None  # the step benches read a synthetic D=1280 store of N rows, else the eval's
    matmul_size: int
    compile_mode: str  # the step benches' first compile mode
    recipe_overrides: dict[str, Any] = field(default_factory=dict)  # the check recipe's sizes (eval, student)
    cap_scale: float = 1.0  # step caps x this


def sizes(dry: bool) -> Sizes:
    if dry:
        # No loader workers (their start-up is most of a tiny run on a small CPU), a one-block student.
        return Sizes(
            dry=True,
            budget_s=200,
            min_step_s=5,
            device="cpu",
            base_recipe="demo",
            bench_teacher=TINY_TEACHER,
            bench_clips=8,
            teacher_batch=2,
            decode_workers=0,
            train_clips=8,
            val_clips=8,
            step_batches=2,
            synthetic_rows=None,
            matmul_size=256,
            compile_mode="off",
            cap_scale=0.4,
            recipe_overrides={
                "build_loader.num_workers": 0,
                "train_loader.num_workers": 0,
                "train.batch_size": 1,
                "model.student_kwargs": {"depth": 1, "embed_dim": 64, "num_heads": 2},
                "model.predictor_width": 64,
                "model.predictor_depth": 1,
                "model.predictor_heads": 2,
                "eval.train_rows": 4,
                "eval.val_rows": 2,
                "eval.temporal_rows": 1,
                "eval.batch_size": 4,
                "eval.probe_epochs": 2,
                "eval.probe_batch_size": 4,
                "eval.linear_iterations": 5,
                "eval.probe_seeds": 1,
                "eval.probe_pool": 2,
            },
        )
    return Sizes(
        dry=False,
        budget_s=540,
        min_step_s=30,
        device="cuda",
        base_recipe="ssv2",
        bench_teacher=HUGE_RANDOM_TEACHER,
        bench_clips=256,
        teacher_batch=16,
        decode_workers=max(1, (os.cpu_count() or 4) - 2),
        train_clips=64,
        val_clips=32,
        step_batches=20,
        synthetic_rows=128,
        matmul_size=8192,
        compile_mode="default",
        recipe_overrides={"eval.train_rows": 64, "eval.val_rows": 32, "eval.temporal_rows": 16},
    )


def check_recipe(size: Sizes) -> str:
    """The recipe of the check's own stores, run and eval: the base recipe with the tiny teacher (uncompiled:
    the eval's stores only need latents), a two-step run on the live store, and the eval's small sizes."""
    overrides = {
        "teacher.name": TINY_TEACHER,
        "teacher.compile_mode": "off",
        "train.max_steps": 2,
        "train.warmup_steps": 1,
        "train.epochs": 1000,
        "train.device": size.device,
        "stream.snapshot": "none",
        "model.compile_mode": "off",
        "cache.device": size.device,
        **size.recipe_overrides,
    }
    return dump_pipeline(load_pipeline(size.base_recipe, overrides))


# ---- steps ---------------------------------------------------------------------------------------


@dataclass
class Step:
    name: str
    what: str
    command: list[str]
    cap_s: float
    needs: tuple[str, ...] = ()
    read: Callable[[], dict[str, Any]] | None = None  # after success: {"figures", "info", "tables"}
    cuda_only: bool = False  # the extras (compile modes, cuDNN, batch 32): skipped in --dry


def read_bench(path: Path) -> Callable[[], dict[str, Any]]:
    def read() -> dict[str, Any]:
        numbers = json.loads(path.read_text())
        info = numbers.pop("info", {})
        profile = numbers.pop("profile", None)
        result: dict[str, Any] = {"figures": with_units(numbers), "info": info}
        if profile is not None:
            top = profile.pop("top")
            result["figures"] |= with_units({f"profile_{k}": v for k, v in profile.items()})
            result["tables"] = {"top_kernels": [{"name": row.pop("name"), **with_units(row)} for row in top]}
        return result

    return read


def read_eval(path: Path) -> Callable[[], dict[str, Any]]:
    def read() -> dict[str, Any]:
        report = json.loads(path.read_text())
        numbers = {"wall_s": report["seconds"]} | {f"{phase}_s": s for phase, s in report["seconds_by_phase"].items()}
        # --profile: how busy the device was in each phase, and where that phase's time went
        by_phase = report.get("profile", {}).get("by_phase", {})
        numbers |= {f"{phase}_busy_fraction": p["busy_fraction"] for phase, p in by_phase.items()}
        top = {phase: p["top"][:3] for phase, p in by_phase.items()}
        return {"figures": with_units(numbers), "info": {"device": report["device"], "top_by_phase": top}}

    return read


def plan(size: Sizes, out: Path) -> list[Step]:
    py = sys.executable
    steps_dir, work = out / "steps", out / "work"
    recipe = work / "check-recipe.yaml"
    src = work / "ssv2"
    train_store, val_store = work / "eval-train.zarr", work / "eval-val.zarr"
    step_store = work / "synthetic.zarr" if size.synthetic_rows else train_store
    scale = size.cap_scale

    def cap(seconds: float) -> float:
        return seconds * scale

    def build_bench(
        name: str, what: str, batch: int, compile_mode: str, cap_s: float, cuda_only: bool, attention: str = "auto"
    ) -> Step:
        result = steps_dir / f"{name}.json"
        return Step(
            name,
            what,
            [
                py,
                "-m",
                "salt_cache",
                "bench",
                "--src",
                str(src),
                "--clips",
                str(size.bench_clips),
                "--teacher",
                size.bench_teacher,
                "--batch-size",
                str(batch),
                "--workers",
                str(size.decode_workers),
                "--device",
                size.device,
                "--teacher-compile",
                compile_mode,
                "--teacher-attention",
                attention,
                "--out",
                str(work),
                "--json",
                str(result),
            ],
            cap(cap_s),
            needs=("demo_data",),
            read=read_bench(result),
            cuda_only=cuda_only,
        )

    def step_bench(name: str, mask: str, compile_mode: str, cap_s: float, profile: bool, cuda_only: bool) -> Step:
        result = steps_dir / f"{name}.json"
        command = [
            py,
            "-m",
            "salt_train",
            "bench",
            "--cache",
            str(step_store),
            "--pipeline",
            str(recipe),
            "--batches",
            str(size.step_batches),
            "--set",
            f"mask.kind={mask}",
            "--set",
            f"model.compile_mode={compile_mode}",
            "--json",
            str(result),
        ]
        if size.synthetic_rows:
            command += ["--synthetic", str(size.synthetic_rows)]
        if profile:
            command += ["--profile", str(work / f"profile-{name}")]
        what = f"student step ({mask} mask, compile {compile_mode}) from memory and from the loader" + (
            ", profiled" if profile else ""
        )
        return Step(
            name,
            what,
            command,
            cap(cap_s),
            needs=() if size.synthetic_rows else ("eval_store_train",),
            read=read_bench(result),
            cuda_only=cuda_only,
        )

    def store(name: str, split: str, out_store: Path) -> Step:
        return Step(
            name,
            f"small {split} store for the eval (tiny teacher)",
            [
                py,
                "-m",
                "salt_cache",
                "build",
                "--src",
                str(src),
                "--split",
                split,
                "--pipeline",
                str(recipe),
                "--out",
                str(out_store),
            ],
            cap(90),
            needs=("demo_data",),
        )

    run_dir = work / "run"
    return [
        Step(
            "device",
            "the device and its measured bf16 matmul rate",
            [
                py,
                str(Path(__file__).resolve()),
                "--internal-device",
                "--device",
                size.device,
                "--matmul-size",
                str(size.matmul_size),
                "--json",
                str(steps_dir / "device.json"),
            ],
            cap(60),
            read=read_bench(steps_dir / "device.json"),
        ),
        Step(
            "demo_data",
            "synthetic SSv2-layout clips",
            [
                py,
                "-m",
                "salt_cache",
                "demo-data",
                "--out",
                str(src),
                "--train",
                str(max(size.bench_clips, size.train_clips)),
                "--validation",
                str(size.val_clips),
                "--test",
                "0",
            ],
            cap(120),
        ),
        store("eval_store_train", "train", train_store),
        store("eval_store_val", "validation", val_store),
        build_bench(
            "build_bench",
            f"teacher-only and end-to-end build ({size.bench_teacher}, batch "
            f"{size.teacher_batch}, compile {size.compile_mode})",
            size.teacher_batch,
            size.compile_mode,
            180,
            False,
        ),
        step_bench("step_random", "random", size.compile_mode, 150, False, False),
        step_bench("step_multiblock", "multiblock", size.compile_mode, 150, True, False),
        Step(
            "eval_run",
            "a two-step run of the recipe's student on the eval store (what eval reads)",
            [
                py,
                "-m",
                "salt_train",
                "run",
                "--cache",
                str(train_store),
                "--pipeline",
                str(recipe),
                "--run-dir",
                str(run_dir),
            ],
            cap(120),
            needs=("eval_store_train",),
        ),
        Step(
            "eval",
            "the fast eval's wall time and its phases, profiled (device busy share and top kernels per phase)",
            [
                *(py, "-m", "salt_train", "eval", str(run_dir), "--val-cache", str(val_store)),
                *("--device", size.device, "--profile"),
            ],
            cap(150),
            needs=("eval_run", "eval_store_val"),
            read=read_eval(run_dir / "eval" / "eval.json"),
        ),
        # With the time left (CUDA only): the slower compiles and the teacher's choices (batch, attention kernel,
        # compile mode).
        step_bench("step_multiblock_max_autotune", "multiblock", "max-autotune", 270, False, True),
        build_bench("teacher_batch32", "the build at teacher batch 32", 32, "default", 180, True),
        build_bench(
            "teacher_cudnn",
            "the build with the teacher's attention on cuDNN",
            size.teacher_batch,
            "default",
            180,
            True,
            attention="cudnn",
        ),
        build_bench(
            "teacher_max_autotune",
            "the build with the teacher compiled max-autotune",
            size.teacher_batch,
            "max-autotune",
            300,
            True,
        ),
        step_bench("step_random_max_autotune", "random", "max-autotune", 270, False, True),
    ]


# ---- running -------------------------------------------------------------------------------------


def run_command(command: list[str], log_path: Path, timeout_s: float) -> tuple[str, str | None]:
    """Run ``command`` in its own process group, output to ``log_path``; ("ok"|"failed"|"timeout", reason).

    On timeout, or when this process is stopped, the whole group goes (SIGTERM, then SIGKILL after 10 s);
    each child also dies with this process (parent-death signal)."""
    env = dict(
        os.environ,
        PYTHONUNBUFFERED="1",
        PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
    )
    with log_path.open("w") as log:
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            process_group=0,
            preexec_fn=parent_death.die_with_parent,
        )
        try:
            code = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _end_group(process)
            return "timeout", f"still running after its limit of {timeout_s:.0f} s"
        except BaseException:
            _end_group(process)
            raise
    if code != 0:
        return "failed", f"exit {code}: {_last_line(log_path)}"
    return "ok", None


def _end_group(process: subprocess.Popen) -> None:
    for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def _last_line(log_path: Path) -> str:
    lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(no output)"


def unit_pair(value: float | None, unit: str) -> dict[str, Any]:
    return {"value": None if value is None else round(value, 3), "unit": unit}


def run_check(size: Sizes, out: Path, keep_work: bool) -> dict[str, Any]:
    prepare_out(out)
    (out / "work").mkdir()
    (out / "steps").mkdir()
    write_text_atomic(out / "work" / "check-recipe.yaml", check_recipe(size))
    started = time.perf_counter()
    deadline = started + size.budget_s
    record: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "dry": size.dry,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "budget": unit_pair(size.budget_s, "s"),
        "wall": unit_pair(None, "s"),
        "steps": {},
    }
    try:
        for step in plan(size, out):
            left = deadline - time.perf_counter()
            entry: dict[str, Any] = {
                "what": step.what,
                "command": " ".join(step.command),
                "log": f"steps/{step.name}.log",
                "limit": unit_pair(None, "s"),
                "wall": unit_pair(None, "s"),
                "reason": None,
                "figures": {},
            }
            missing = [need for need in step.needs if record["steps"].get(need, {}).get("status") != "ok"]
            if step.cuda_only and size.dry:
                entry |= {
                    "status": "skipped",
                    "reason": "--dry: a CUDA-only step (compile modes, cuDNN, GPU batch sizes)",
                }
            elif missing:
                entry |= {"status": "skipped", "reason": f"needs {', '.join(missing)}, which did not pass"}
            elif left < size.min_step_s:
                entry |= {"status": "skipped", "reason": f"{left:.0f} s of the budget left"}
            else:
                limit = min(step.cap_s, left)
                step_started = time.perf_counter()
                status, reason = run_command(step.command, out / "steps" / f"{step.name}.log", limit)
                entry |= {
                    "status": status,
                    "reason": reason,
                    "limit": unit_pair(limit, "s"),
                    "wall": unit_pair(time.perf_counter() - step_started, "s"),
                }
                if status == "ok" and step.read is not None:
                    try:
                        entry |= step.read()
                    except (OSError, ValueError, KeyError) as exc:
                        entry |= {"status": "failed", "reason": f"its figures are unreadable: {exc}"}
            record["steps"][step.name] = entry
            record["wall"] = unit_pair(time.perf_counter() - started, "s")
            print(
                f"gpu-check: {step.name}: {entry['status']}"
                + (f" in {entry['wall']['value']:.1f} s" if entry["wall"]["value"] is not None else "")
                + (f" ({entry['reason']})" if entry["reason"] else ""),
                flush=True,
            )
            write_json_atomic(out / RESULT, record)
    finally:
        write_text_atomic(out / SUMMARY, summary(record))
        if not keep_work:
            shutil.rmtree(out / "work", ignore_errors=True)
    return record


def prepare_out(out: Path) -> None:
    """A new or empty folder, or one an earlier check wrote (its steps and scratch are cleared)."""
    if out.exists() and not out.is_dir():
        raise SaltUsageError(f"--out {out} is a file; it must be a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).exists():
        raise SaltUsageError(f"--out {out} holds files gpu-check did not write; choose a new or empty folder")
    for name in ("steps", "work"):
        shutil.rmtree(out / name, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).touch()


# ---- the summary ---------------------------------------------------------------------------------


def _fmt(pair: dict[str, Any]) -> str:
    value = pair["value"]
    if value is None:
        return "n/a"
    if pair["unit"] == "fraction":
        return f"{value:.1%}"
    return f"{value:.4g} {pair['unit']}"


def summary(record: dict[str, Any]) -> str:
    device = record["steps"].get("device", {}).get("info", {}).get("name", "?")
    lines = [
        f"# SALT gpu-check{' (DRY: CPU, tiny sizes)' if record['dry'] else ''} on {device}",
        "",
        f"{record['created']}, host {record['host']}: {_fmt(record['wall'])} of a {_fmt(record['budget'])} "
        "budget. Figures in gpu-check.json; each step's log in steps/.",
        "",
        "| step | status | wall | limit | what |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, step in record["steps"].items():
        status = step["status"] + (f": {step['reason']}" if step["reason"] else "")
        lines.append(f"| {name} | {status} | {_fmt(step['wall'])} | {_fmt(step['limit'])} | {step['what']} |")
    for name, step in record["steps"].items():
        if not step["figures"] and not step.get("info"):
            continue
        lines += ["", f"## {name}", ""]
        lines += [f"- {key}: {value}" for key, value in step.get("info", {}).items()]
        lines += [f"- {key}: {_fmt(pair)}" for key, pair in step["figures"].items()]
        for table, rows in step.get("tables", {}).items():
            lines += [
                "",
                f"{table}:",
                "",
                "| kernel | per step | calls per step | share |",
                "| --- | --- | --- | --- |",
            ]
            lines += [
                f"| `{row['name'][:80]}` | {_fmt(row['ms_per_step'])} | {_fmt(row['calls_per_step_count'])} "
                f"| {_fmt(row['share_fraction'])} |"
                for row in rows
            ]
    return "\n".join(lines) + "\n"


# ---- the device step (run as a subprocess of the check, like every step) -------------------------


def device_step(device_name: str, matmul_size: int, out: Path) -> None:
    import torch

    from shared.device import resolve_device
    from shared.flops import matmul_tflops, peak_bf16_tflops

    device = resolve_device(device_name)
    measured = matmul_tflops(device, size=matmul_size)
    info: dict[str, Any] = {
        "name": "CPU",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_cores": os.cpu_count(),
    }
    numbers: dict[str, Any] = {
        "matmul_bf16_tflop_per_s": measured,
        "peak_bf16_tflop_per_s": None,
        "matmul_peak_fraction": None,
        "gpu_memory_bytes": None,
        "multiprocessors_count": None,
    }
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        peak = peak_bf16_tflops(properties.name)
        info |= {
            "name": properties.name,
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
            "peak_source": f"shared/flops.py: {peak[0]}" if peak else "not in shared/flops.py",
        }
        numbers |= {
            "gpu_memory_bytes": properties.total_memory,
            "multiprocessors_count": properties.multi_processor_count,
            "peak_bf16_tflop_per_s": peak[1] if peak else None,
            "matmul_peak_fraction": measured / peak[1] if peak else None,
        }
    write_json_atomic(out, numbers | {"info": info})


# ---- command line --------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Measure everything a lent GPU should tell (make gpu-check).")
    parser.add_argument("--out", type=Path, default=ROOT / "gpu-check", help="output folder [gpu-check/]")
    parser.add_argument("--dry", action="store_true", help="the same steps on CPU at tiny sizes")
    parser.add_argument("--keep-work", action="store_true", help="keep the scratch stores and profile traces")
    parser.add_argument("--internal-device", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    parser.add_argument("--matmul-size", type=int, default=8192, help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # finally-blocks end the steps
    try:
        if args.internal_device:
            device_step(args.device, args.matmul_size, args.json)
            return EXIT_OK
        size = sizes(args.dry)
        if not size.dry:
            import torch

            if not torch.cuda.is_available():
                raise SaltUsageError("no CUDA device: make gpu-check needs one GPU (DRY=1 runs the steps on CPU)")
        record = run_check(size, args.out, args.keep_work)
    except SaltUsageError as exc:
        print(f"gpu-check: {exc}", file=sys.stderr)
        return EXIT_USAGE
    failed = [name for name, step in record["steps"].items() if step["status"] in ("failed", "timeout")]
    print(
        f"gpu-check: {args.out / RESULT} and {args.out / SUMMARY}"
        + (f"; not passed: {', '.join(failed)}" if failed else "")
    )
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
