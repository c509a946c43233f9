"""`salt-cache`: build, verify and inspect the latent-cache store."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from shared.cli import make_app, run_app
from shared.config import load_pipeline
from shared.console import print_block, setup_logging
from shared.errors import EXIT_OK, EXIT_PROBLEMS, SaltUsageError

app = make_app(
    "Build the SALT latent cache: decode SSv2 clips into 16x224x224 views, run the frozen "
    "VideoMAE teacher, and store pixels and latents in one Zarr v3 store."
)


@app.command()
def build(
    src: Path = typer.Option(..., "--src", help="SSv2 root (official or flat layout)"),
    split: Optional[str] = typer.Option(None, help="train, validation or test [pipeline: train]"),
    out: Optional[Path] = typer.Option(None, help="store path [SRC/latents.zarr]"),
    teacher: Optional[str] = typer.Option(None, help="VideoMAE hub id, save_pretrained folder, or builtin:tiny-videomae"),
    pipeline: Optional[str] = typer.Option(None, help="recipe YAML or name in pipelines/ [ssv2]"),
    limit: Optional[int] = typer.Option(None, help="only the first N clips of the split"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="clips per teacher forward"),
    workers: Optional[int] = typer.Option(None, help="DataLoader decode workers"),
    device: Optional[str] = typer.Option(None, help="auto, cpu or cuda"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> int:
    """Build or resume a store. Rerunning the same command finishes only what is not committed."""
    setup_logging(verbose)
    from salt_cache.source import discover

    config = load_pipeline(pipeline, {
        "cache.split": split, "cache.limit": limit, "cache.device": device, "teacher.name": teacher,
        "teacher.batch_size": batch_size, "loader.num_workers": workers,
    })
    source = discover(src, config.cache.split, config.cache.limit)
    out = out or source.root / "latents.zarr"
    if out.exists() and not out.is_dir():
        raise SaltUsageError(f"--out {out} is a file; a store is a folder")
    from salt_cache.build import run_build  # torch and friends only once the arguments are sound
    from salt_cache.teacher import load_teacher

    model = load_teacher(config.teacher.name, config.cache.device, config.teacher.dtype)
    import torch

    resume_hint = "committed shards are safe; rerun the same command to resume"
    try:
        report = run_build(source, model, config, out)
    except KeyboardInterrupt:
        print(f"salt-cache: interrupted; {resume_hint}", file=sys.stderr)
        return 130
    except torch.cuda.OutOfMemoryError:
        raise SaltUsageError(f"teacher batch of {config.teacher.batch_size} does not fit in GPU memory; "
                             f"lower --batch-size ({resume_hint})") from None
    except OSError as exc:  # disk full, store folder removed or read-only, ...
        raise SaltUsageError(f"cannot write store {out}: {exc.strerror or exc}; {resume_hint}") from None
    print_block(f"built {out}", report.summary(), stream=sys.stdout)
    return EXIT_OK if report.pending == 0 else EXIT_PROBLEMS


@app.command()
def verify(
    store: Path = typer.Argument(Path("latents.zarr"), help="store to check [./latents.zarr]"),
    deep: int = typer.Option(0, "--deep", min=0, help="re-run the recorded teacher on K rows and compare"),
    as_json: bool = typer.Option(False, "--json", help="print a machine-readable report"),
    device: str = typer.Option("auto", help="device for --deep"),
) -> int:
    """Exit 0 if every row is committed and intact or failed with a reason, 1 if not, 2 on bad input."""
    setup_logging()
    from salt_cache.verify import verify_store

    report = verify_store(str(store), deep=deep, device=device)
    if as_json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        summary = {"rows": report.rows, "committed": report.committed, "failed": report.failed,
                   "pending": report.pending, "problems": len(report.problems)}
        if report.deep:
            worst = max(d["relative_l2"] for d in report.deep)
            summary["deep check"] = f"{len(report.deep)} rows, worst relative L2 {worst:.2e}"
        print_block(f"verify {store}: {'OK' if report.ok else 'PROBLEMS'}", summary, stream=sys.stdout)
        for problem in report.problems[:50]:
            print(f"  problem: {problem.line()}")
        if len(report.problems) > 50:
            print(f"  ... and {len(report.problems) - 50} more (use --json for all)")
    return EXIT_OK if report.ok else EXIT_PROBLEMS


@app.command("demo-data")
def demo_data(
    out: Path = typer.Option(..., "--out", help="folder to create (official SSv2 layout)"),
    train: int = typer.Option(24, min=1, help="training clips"),
    validation: int = typer.Option(8, min=0, help="validation clips"),
    test: int = typer.Option(4, min=0, help="test clips"),
    seed: int = typer.Option(0),
) -> int:
    """Write a small synthetic SSv2-layout set: shapes moving as their templates say."""
    from salt_cache.demo_data import write_demo_dataset

    if out.exists() and not out.is_dir():
        raise SaltUsageError(f"--out {out} is a file")
    try:
        counts = write_demo_dataset(out, train=train, validation=validation, test=test, seed=seed)
    except FileExistsError as exc:
        raise SaltUsageError(f"{out} already holds demo videos ({exc}); choose another --out") from None
    print_block(f"demo data in {out}", counts, stream=sys.stdout)
    return EXIT_OK


@app.command()
def bench(
    src: Path = typer.Option(..., "--src", help="SSv2-layout folder to read clips from"),
    clips: int = typer.Option(32, min=1, help="clips to decode and encode"),
    teacher: str = typer.Option("builtin:tiny-videomae", help="teacher to time"),
    batch_size: int = typer.Option(4, min=1),
    workers: int = typer.Option(2, min=0, help="DataLoader workers for the decode rate"),
    device: str = typer.Option("auto"),
    out: Optional[Path] = typer.Option(None, help="scratch store folder [temporary]"),
) -> int:
    """Print decode, teacher and store-write rates (figures for EXPERIMENTS.md)."""
    setup_logging()
    from salt_cache.bench import run_bench

    figures = run_bench(src, clips=clips, teacher_name=teacher, batch_size=batch_size,
                        workers=workers, device=device, scratch=out)
    print_block("salt-cache bench", figures, stream=sys.stdout)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    return run_app(app, "salt-cache", argv)


if __name__ == "__main__":
    sys.exit(main())
