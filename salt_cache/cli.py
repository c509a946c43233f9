"""`salt-cache`: build, verify and inspect the latent-cache store."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import typer

from shared import parent_death
from shared.cli import DEVICE_HELP, Device, TeacherAttentionChoice, TeacherCompile, make_app, run_app
from shared.config import PipelineConfig, load_pipeline
from shared.console import is_console_rank, print_block, rank_tag, setup_logging
from shared.errors import EXIT_OK, EXIT_PROBLEMS, SaltUsageError
from shared.latent_stats import DEFAULT_ROWS, SUMMARY_ROWS, compute_stats
from shared.torchrun_env import env_world_size

_DEFAULTS = PipelineConfig()  # the schema's defaults are the ssv2 recipe (tests check they agree)


def _from_pipeline(value: object) -> str:
    return f"[from the pipeline; ssv2: {value}]"


def _check_out_path(out: Path, what: str, named: str = "--out") -> None:
    """Refuse an --out that is a file or lies under one, before anything is loaded or written.
    ``named``: how the message names the path (the flag, or where a default came from)."""
    for ancestor in (out, *out.parents):
        if os.path.exists(ancestor):
            if os.path.isdir(ancestor):
                return
            raise SaltUsageError(
                f"{named} {out} is a file; {what} is a folder"
                if ancestor == out
                else f"{named} {out}: {ancestor} is a file"
            )


app = make_app(
    "Build the SALT latent cache: decode SSv2 clips into 16x224x224 views, run the frozen "
    "VideoMAE teacher, and store pixels and latents in one Zarr v3 store."
)


@app.command()
def build(
    src: Path | None = typer.Option(None, "--src", help="SSv2 root (official or flat layout)"),
    split: str | None = typer.Option(None, help=f"train, validation or test {_from_pipeline(_DEFAULTS.cache.split)}"),
    out: Path | None = typer.Option(None, help="store path [SRC/latents.zarr]"),
    teacher: str | None = typer.Option(None, help="VideoMAE hub id, save_pretrained folder, or builtin:tiny-videomae"),
    pipeline: str | None = typer.Option(None, help="recipe YAML or name in pipelines/ [ssv2]"),
    limit: int | None = typer.Option(None, help="only the first N clips of the split"),
    batch_size: int | None = typer.Option(
        None,
        "--batch-size",
        help=f"clips per teacher forward {_from_pipeline(_DEFAULTS.teacher.batch_size)}",
    ),
    workers: int | None = typer.Option(
        None, help=f"decode workers, build_loader.num_workers {_from_pipeline(_DEFAULTS.build_loader.num_workers)}"
    ),
    device: Device | None = typer.Option(None, help=f"{DEVICE_HELP} {_from_pipeline(_DEFAULTS.cache.device)}"),
    retry_failed: bool = typer.Option(
        False, "--retry-failed", help="also redo shards holding failed rows (after their videos were fixed)"
    ),
    repair: bool = typer.Option(
        False,
        "--repair",
        help="also rebuild the committed shards salt-cache verify finds damaged (read "
        "whole first); the recipe is the store's own unless --pipeline is given",
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="debug logging (per-shard and per-clip detail)"),
    force: bool = typer.Option(
        False,
        "--force",
        help="start even when the projected store size exceeds the free "
        "disk space (the projection counts pixels uncompressed)",
    ),
    pixels_only: bool = typer.Option(
        False,
        "--pixels-only",
        help="no teacher: store the views only (for salt-train teacher, and a later --from-store build of its latents)",
    ),
    from_store: Path | None = typer.Option(
        None,
        "--from-store",
        help="read the views from this (pixels-only) "
        "store instead of decoding --src: a new store at --out with the same "
        "rows and --teacher's latents",
    ),
) -> int:
    """Build or resume a store. Rerunning the same command finishes only what is not committed.

    Under torchrun (torchrun --nproc-per-node=K -m salt_cache build ...) the ranks split the shards
    still to do; a stopped multi-rank build resumes with any number of ranks."""
    if (src is None) == (from_store is None):
        raise SaltUsageError(
            "pass --src DIR (decode the videos) or --from-store STORE (read its views), not "
            + ("both" if src is not None else "neither")
        )
    if from_store is not None and (pixels_only or out is None or split or limit):
        raise SaltUsageError(
            "--from-store builds a new store of the pixels store's rows: it needs --out and takes "
            "no --pixels-only, --split or --limit"
        )
    if pixels_only and teacher:
        raise SaltUsageError("--pixels-only stores no latents: drop --teacher")
    if out is None:  # beside the videos (--from-store needs --out); a --src that is no folder is discover()'s to refuse
        assert src is not None  # refused above otherwise
        out = src / "latents.zarr"
        if src.is_dir():
            _check_out_path(out, "a store", named="the default store")
    else:
        _check_out_path(out, "a store")
    setup_logging(verbose)
    parent_death.install()  # decode workers and the forkserver die with this process, even by kill -9
    from shared.ssv2 import discover

    from salt_cache.identity import BuildSource
    from salt_cache.repair import recorded_recipe

    if from_store is not None:  # the pixels store's split decides its views per clip, as a decoding build's would
        from shared.store import LatentStore

        split = LatentStore.open(from_store).attrs.get("source", {}).get("split")
    flags = {
        "cache.split": split,
        "cache.limit": limit,
        "cache.device": device.value if device else None,
        "teacher.name": teacher,
        "teacher.batch_size": batch_size,
        "build_loader.num_workers": workers,
    }
    # A repair rebuilds shards as the store was built: its recorded recipe, unless --pipeline says otherwise.
    recorded = recorded_recipe(out) if repair and pipeline is None else {}
    config = load_pipeline(pipeline, {**recorded, **{key: value for key, value in flags.items() if value is not None}})
    from salt_cache.views import recipe_for_split

    config, note = recipe_for_split(config)
    if note and is_console_rank():
        print(f"salt-cache: note: {note}", file=sys.stderr)
    if from_store is not None:
        from salt_cache.fill import open_pixels_source

        source: BuildSource = open_pixels_source(from_store, config)
    else:
        assert src is not None  # refused above otherwise
        source = discover(src, config.cache.split, config.cache.limit)
    import torch

    from shared.distributed import distributed, is_lost_peer
    from shared.teacher import load_teacher

    from salt_cache.build import DecodeWorkerDied, Terminated, run_build, stop_on_sigterm  # torch only now

    def resume_hint() -> str:  # only true once the store folder exists
        ranks = " (with any number of ranks)" if env_world_size() > 1 else ""
        return f"; committed shards are safe; rerun the same command to resume{ranks}" if out.is_dir() else ""

    with distributed("gloo") as dist, stop_on_sigterm():
        try:
            from salt_cache.fill import NoTeacher
            from salt_cache.identity import BuildTeacher

            model: BuildTeacher = (
                NoTeacher()
                if pixels_only
                else dist.agree(
                    lambda: load_teacher(
                        config.teacher.name,
                        config.cache.device,
                        config.teacher.dtype,
                        config.teacher.compile_mode,
                        config.teacher.attention,
                    )
                )
            )
            report = run_build(
                source, model, config, out, retry_failed=retry_failed, dist=dist, force=force, repair=repair
            )
        except KeyboardInterrupt:
            print(f"salt-cache{rank_tag()}: interrupted{resume_hint()}", file=sys.stderr)
            return 130
        except Terminated:
            why = " (torchrun stops every rank so when one fails: see its report)" if dist.enabled else ""
            print(f"salt-cache{rank_tag()}: stopped by SIGTERM{why}{resume_hint()}", file=sys.stderr)
            return 143
        except torch.cuda.OutOfMemoryError:
            raise SaltUsageError(
                f"teacher batch of {config.teacher.batch_size} does not fit in GPU memory; "
                f"lower --batch-size{resume_hint()}"
            ) from None
        except OSError as exc:  # disk full, store folder removed or read-only, ...
            raise SaltUsageError(f"cannot write store {out}: {exc.strerror or exc}{resume_hint()}") from None
        except DecodeWorkerDied as exc:
            print(f"salt-cache{rank_tag()}: error: {exc}{resume_hint()}", file=sys.stderr)
            return EXIT_PROBLEMS
        except RuntimeError as exc:
            if not is_lost_peer(exc):
                raise
            print(
                f"salt-cache{rank_tag()}: error: lost contact with another rank of this torchrun job "
                f"({type(exc).__name__}){resume_hint()}",
                file=sys.stderr,
            )
            return EXIT_PROBLEMS
    print_block(f"built {out}", report.summary(), stream=sys.stdout)
    if report.committed == 0 and report.failed > 0:
        if is_console_rank():
            print(f"salt-cache: error: {nothing_built(out, report.failed)}", file=sys.stderr)
        return EXIT_PROBLEMS
    if not pixels_only:
        build_stats_block(out)
    return EXIT_OK if report.pending == 0 else EXIT_PROBLEMS


def nothing_built(out: Path, failed: int) -> str:
    """The line of a build whose every row failed: the store holds nothing to train on."""
    import numpy as np

    from shared.errors import one_line
    from shared.store import LatentStore, RowStatus

    store = LatentStore.open(out)
    failures = np.flatnonzero(store.status() == RowStatus.FAILED)
    reason = str(store.array("error")[int(failures[0])]) if len(failures) else "unknown"
    return (
        f"every one of the {failed} rows failed, none committed: {out} holds nothing to train on "
        f"(first reason: {one_line(reason, 200)}); fix the source or the teacher, then rerun with --retry-failed"
    )


@app.command()
def verify(
    store: Path = typer.Argument(Path("latents.zarr"), help="store to check"),
    deep: int = typer.Option(0, "--deep", min=0, help="re-run the recorded teacher on K rows and compare"),
    as_json: bool = typer.Option(False, "--json", help="print a machine-readable report"),
    device: Device = typer.Option(Device.auto, help=f"device for --deep: {DEVICE_HELP}"),
    threads: int = typer.Option(4, min=1, help="shards checked at once (about 100 MB of memory each)"),
) -> int:
    """Exit 0 if every row is committed and intact or failed with a reason, 1 if not, 2 on bad input."""
    setup_logging()
    from salt_cache.verify import verify_store

    report = verify_store(str(store), deep=deep, device=device.value, threads=threads)
    if as_json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        summary: dict[str, object] = {
            "rows": report.rows,
            "committed": report.committed,
            "failed": report.failed,
            "pending": report.pending,
            **({"unknown status": report.other} if report.other else {}),
            "problems": len(report.problems),
        }
        if report.deep:
            worst = max(d["relative_l2"] for d in report.deep)
            summary["deep check"] = f"{len(report.deep)} rows, worst relative L2 {worst:.2e}"
        print_block(f"verify {store}: {'OK' if report.ok else 'PROBLEMS'}", summary, stream=sys.stdout)
        for problem in report.problems[:50]:
            print(f"  problem: {problem.line()}")
        if len(report.problems) > 50:
            print(f"  ... and {len(report.problems) - 50} more (use --json for all)")
        if report.fix:
            print(f"  fix: {report.fix}")
    return EXIT_OK if report.ok else EXIT_PROBLEMS


@app.command("demo-data")
def demo_data(
    out: Path = typer.Option(..., "--out", help="folder to create or fill (official SSv2 layout)"),
    train: int = typer.Option(96, min=1, help="training clips"),
    validation: int = typer.Option(64, min=0, help="validation clips (64: enough for the probes of salt-train eval)"),
    test: int = typer.Option(4, min=0, help="test clips"),
    seed: int = typer.Option(0, min=0, help="random seed; the same seed gives the same set"),
) -> int:
    """Write a small synthetic SSv2-layout set: shapes moving as their templates say.

    Refuses, writing nothing, when any file it would write already exists.
    """
    from salt_cache.demo_data import DemoDataExists, write_demo_dataset

    _check_out_path(out, "the demo set")
    try:
        counts = write_demo_dataset(out, train=train, validation=validation, test=test, seed=seed)
    except DemoDataExists as exc:
        raise SaltUsageError(f"--out {out}: {exc}; nothing written, choose another --out") from None
    except OSError as exc:  # read-only or missing parent, /proc, disk full, ...
        raise SaltUsageError(f"cannot write demo data to {out}: {exc.strerror or exc}") from None
    print_block(f"demo data in {out}", counts, stream=sys.stdout)
    return EXIT_OK


@app.command()
def bench(
    src: Path = typer.Option(..., "--src", help="SSv2-layout folder to read clips from"),
    clips: int = typer.Option(32, min=1, help="clips to decode and encode"),
    teacher: str = typer.Option("builtin:tiny-videomae", help="teacher to time"),
    batch_size: int = typer.Option(4, min=1, help="clips per teacher forward and per DataLoader batch"),
    workers: int = typer.Option(2, min=0, help="DataLoader workers for the decode rate"),
    device: Device = typer.Option(Device.auto, help=f"teacher device: {DEVICE_HELP}"),
    out: Path | None = typer.Option(None, help="existing folder for the scratch stores [system temp]"),
    host_path: bool = typer.Option(
        False,
        "--host-path",
        help="no teacher: fixed latents of --width, to time the "
        "build's host path (decode, checksums, zstd, writes) on any machine",
    ),
    width: int = typer.Option(1280, min=1, help="latent width with --host-path (1280: ViT-H, production)"),
    writers: int = typer.Option(4, min=1, help="shard writer threads of the end-to-end build"),
    teacher_compile: TeacherCompile = typer.Option(
        TeacherCompile.auto,
        "--teacher-compile",
        help="torch.compile mode of the teacher (auto: default on CUDA, off on CPU)",
    ),
    teacher_attention: TeacherAttentionChoice = typer.Option(
        TeacherAttentionChoice.auto,
        "--teacher-attention",
        help="the teacher's attention kernel (auto: PyTorch's choice; cudnn, flash, efficient: CUDA only)",
    ),
    json_out: Path | None = typer.Option(
        None, "--json", help="also write the figures as numbers to this file (each with its unit in its name)"
    ),
) -> int:
    """Print decode-only, teacher-only and end-to-end build rates from one run (figures for EXPERIMENTS.md)."""
    setup_logging()
    if out is not None and not out.is_dir():
        raise SaltUsageError(
            f"--out {out} "
            + ("is a file; it must be a folder" if out.exists() else "does not exist; create it or drop --out")
        )
    from shared.device import resolve_device
    from shared.filesystem import write_json_atomic

    from salt_cache.bench import run_bench

    resolved = resolve_device(device.value)  # e.g. cuda without CUDA: say so before minutes of decoding
    if teacher_attention.value not in ("auto", "math") and resolved.type != "cuda":
        raise SaltUsageError(
            f"--teacher-attention {teacher_attention.value} is a CUDA kernel; on {resolved} use auto or math"
        )
    figures, numbers = run_bench(
        src,
        clips=clips,
        teacher_name=teacher,
        batch_size=batch_size,
        workers=workers,
        device=device.value,
        scratch=out,
        host_path=host_path,
        width=width,
        writers=writers,
        teacher_compile=teacher_compile.value,
        teacher_attention=teacher_attention.value,
    )
    print_block("salt-cache bench", figures, stream=sys.stdout)
    if json_out is not None:
        write_json_atomic(json_out, numbers)
    return EXIT_OK


@app.command()
def stats(
    store: Path = typer.Argument(..., help="store to measure"),
    rows: int = typer.Option(
        DEFAULT_ROWS, "--rows", min=0, help="committed rows read: a seeded sample of N (0: every committed row)"
    ),
    seed: int = typer.Option(0, "--seed", min=0, help="seed of the row sample"),
    as_json: bool = typer.Option(False, "--json", help="print every channel's figures as JSON"),
) -> int:
    """Per-channel mean, std and max |x| of the teacher latents, and the share of the layer-normed
    target energy the 8 largest channels hold, with a warning past the threshold (outlier channels)."""
    setup_logging()
    from shared.store import LatentStore

    measured = compute_stats(LatentStore.open(store).checked(), rows=rows, seed=seed)
    if as_json:
        print(json.dumps({"store": str(store), **measured.to_json()}, indent=1))
        return EXIT_OK
    print_block(
        f"latent statistics of {store}",
        {
            **measured.summary(),
            "tokens": f"{measured.tokens} ({measured.rows_read} rows x {measured.tokens // measured.rows_read})",
            "channel means": f"{measured.mean.min():.4g} to {measured.mean.max():.4g}",
        },
        stream=sys.stdout,
    )
    for line in measured.table():
        print(line)
    warning = measured.warning()
    print(f"WARNING: {warning}" if warning else "no outlier channels: no channel group dominates the normed targets")
    return EXIT_OK


def build_stats_block(out: Path) -> None:
    """The short statistics block at the end of a build (rank 0; a sample of rows, so cheap)."""
    if not is_console_rank():
        return
    from shared.store import LatentStore

    try:
        measured = compute_stats(LatentStore.open(out), rows=SUMMARY_ROWS)
    except SaltUsageError as exc:  # e.g. no committed rows yet: the build's own summary says why
        print(f"target statistics not measured: {exc}", file=sys.stderr)
        return
    print_block("target statistics (salt-cache stats for more)", measured.summary(), stream=sys.stdout)
    warning = measured.warning()
    if warning:
        print(f"WARNING: {warning}", file=sys.stderr)


@app.command("convert-teacher")
def convert_teacher(
    original: Path = typer.Argument(..., help="original-release VideoMAE pretraining checkpoint (.pth)"),
    out: Path = typer.Argument(..., help="new folder for the save_pretrained teacher (pass it to build --teacher)"),
    heads: int | None = typer.Option(None, min=1, help="attention heads [inferred for widths 384, 768, 1024, 1280]"),
) -> int:
    """Convert an original VideoMAE checkpoint (encoder.* keys) into a teacher folder, its final norm kept.

    Read with torch.load(weights_only=True): no pickle code runs. Every key is checked; the
    pixel decoder (decoder.*, encoder_to_decoder, mask_token) is left out on purpose."""
    setup_logging()
    _check_out_path(out, "the teacher")
    from salt_cache.convert_teacher import convert_teacher as convert

    done = convert(original, out, heads)
    config = done.config
    summary = {
        "teacher": f"width {config.hidden_size}, {config.num_hidden_layers} layers, "
        f"{config.num_attention_heads} heads, "
        f"MLP {config.intermediate_size}, final norm applied to every token",
        "converted": f"{done.converted} encoder tensors",
        "left out": f"{len(done.ignored)} decoder tensors"
        + (f"; entries {', '.join(done.other_entries)}" if done.other_entries else ""),
        "use it": f"salt-cache build --teacher {out} ...",
    }
    print_block(f"converted {original} -> {out}", summary, stream=sys.stdout)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    return run_app(app, "salt-cache", argv)


if __name__ == "__main__":
    sys.exit(main())
