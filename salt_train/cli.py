"""`salt-train`: train the SALT student on a latent-cache store.

Commands: ``run`` (train, or continue with ``--resume``), ``teacher`` (SALT's stage 1: train
the teacher by pixel reconstruction, same loop and flags), ``preflight`` (checks
before a long run), ``bench`` (loader and step throughput), ``snapshots``
(list and prune the store's snapshots), ``eval`` (measure an encoder) and ``import-encoder``
(a released V-JEPA or VideoMAE encoder into the export format eval reads).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from shared import parent_death
from shared.cli import DEVICE_HELP, Device, EvalProtocol, SnapshotChoice, make_app, run_app
from shared.config import PipelineConfig, load_pipeline
from shared.console import is_console_rank, print_block, rank_tag, setup_logging
from shared.errors import EXIT_OK, EXIT_PROBLEMS, SaltUsageError

_DEFAULTS = PipelineConfig()  # the schema's defaults are the ssv2 recipe


SNAPSHOT_HELP = (
    "auto: reflink clone where the filesystem can (XFS, btrfs), else read the live store with a "
    "warning and a recorded manifest; reflink: clone or refuse; copy: full copy (slow, explicit); "
    "none: live store"
)
SET_HELP = "override one recipe field, e.g. --set train.lr=1e-4 --set train_loader.num_workers=4 (repeatable)"

app = make_app(
    "Train the SALT student: a timm ViT with a 2x16x16 tubelet embedding regresses the cached "
    "teacher latents on masked tokens, reading a snapshot of a salt-cache store."
)
snapshots_app = make_app("List and prune the snapshots salt-train took of a store.")
app.add_typer(snapshots_app, name="snapshots")


def parse_sets(sets: list[str]) -> dict[str, Any]:
    """``key.path=value`` pairs; values parsed as YAML scalars (``1e-4``, ``true``, ``null``)."""
    overrides: dict[str, Any] = {}
    for item in sets:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise SaltUsageError(f"--set {item!r}: expected KEY=VALUE, e.g. train.lr=1e-4")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise SaltUsageError(f"--set {item!r}: value is not a YAML scalar") from None
        if isinstance(value, bool) and raw.strip().lower() not in ("true", "false"):
            value = raw.strip()  # YAML 1.1 reads off/on/yes/no as booleans: compile_mode=off means "off"
        overrides[key.strip()] = value
    return overrides


def _config(pipeline: str | None, sets: list[str], device: Device | None, **flags: Any) -> PipelineConfig:
    overrides = {**parse_sets(sets), **{k: v for k, v in flags.items() if v is not None}}
    if device is not None:
        overrides["train.device"] = device.value
    return load_pipeline(pipeline, overrides)


# The options `run` and `teacher` share (one loop, two tasks): declared once.
RunDir = Annotated[Path | None, typer.Option("--run-dir", help="run folder [runs/<pipeline>-<time>]")]
MaxSteps = Annotated[int | None, typer.Option("--max-steps", min=1, help="stop after N optimizer steps")]
Resume = Annotated[
    bool,
    typer.Option(
        "--resume", help="continue the run in --run-dir (or this cache's latest run) from its last checkpoint"
    ),
]
Snapshot = Annotated[SnapshotChoice | None, typer.Option(help=f"{SNAPSHOT_HELP} [from the pipeline: auto]")]
TrainDevice = Annotated[
    Device | None, typer.Option(help=f"{DEVICE_HELP} [from the pipeline: {_DEFAULTS.train.device}]")
]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="debug logging")]


@app.command()
def run(
    cache: Path = typer.Option(..., "--cache", help="the store salt-cache built (its snapshot is what training reads)"),
    pipeline: str | None = typer.Option(None, help="recipe YAML or name in pipelines/ [ssv2]"),
    run_dir: RunDir = None,
    max_steps: MaxSteps = None,
    resume: Resume = False,
    snapshot: Snapshot = None,
    device: TrainDevice = None,
    sets: list[str] = typer.Option([], "--set", help=SET_HELP),
    verbose: Verbose = False,
) -> int:
    """Train (or with --resume continue) a run; prints a progress bar, health lines and a summary.

    Under torchrun (torchrun --nproc-per-node=K -m salt_train run ...) it trains with DDP on the same
    global batches; checkpoints resume with any number of ranks."""
    return _train_command(cache, pipeline, run_dir, max_steps, resume, snapshot, device, sets, verbose, "student")


@app.command()
def teacher(
    cache: Path = typer.Option(
        ...,
        "--cache",
        help="a store with pixels (salt-cache build --pixels-only makes one; latents, if any, are not read)",
    ),
    pipeline: str | None = typer.Option(
        None,
        help="recipe YAML or name in pipelines/ [ssv2]: its teacher_train "
        "section (size, decoder, schedule) and mask section",
    ),
    run_dir: RunDir = None,
    max_steps: MaxSteps = None,
    resume: Resume = False,
    snapshot: Snapshot = None,
    device: TrainDevice = None,
    sets: list[str] = typer.Option(
        [], "--set", help="override one recipe field, e.g. --set teacher_train.lr=1e-4 (repeatable)"
    ),
    verbose: Verbose = False,
) -> int:
    """SALT's stage 1: train a video ViT teacher by masked pixel reconstruction (VideoMAE's objective under the
    recipe's masks). Its run folder's export/ is a save_pretrained VideoMAE folder: salt-cache build --teacher
    RUN/export (or --from-store PIXELS --teacher RUN/export) fills a store with its latents.

    The loop is salt-train run's: snapshot, loader, bf16 and compile on CUDA, checkpoints and exact resume,
    health lines, metrics.jsonl, torchrun."""
    return _train_command(cache, pipeline, run_dir, max_steps, resume, snapshot, device, sets, verbose, "teacher")


def _train_command(
    cache: Path,
    pipeline: str | None,
    run_dir: Path | None,
    max_steps: int | None,
    resume: bool,
    snapshot: Any,
    device: Device | None,
    sets: list[str],
    verbose: bool,
    task_name: str,
) -> int:
    """``run`` and ``teacher``: one loop, two tasks (salt_train/task.py)."""
    setup_logging(verbose)
    parent_death.install()  # loader workers and the forkserver die with this process, even by kill -9
    # --snapshot is recorded in config.yaml with the rest: a resume takes a snapshot the run never finished
    # in the mode it was given.
    flags = {"stream.snapshot": snapshot.value if snapshot else None, "train.device": device.value if device else None}
    config = _config(pipeline, sets, None, **flags)
    if resume and pipeline:
        print(
            "salt-train: --resume continues with the run's recorded config.yaml; --pipeline is ignored "
            "(--set may change the settings a resume allows)",
            file=sys.stderr,
        )
    import torch

    from salt_train.checkpoint import CheckpointWriteError
    from salt_train.task import Task
    from salt_train.train import EXIT_STOPPED, LostPeer, RunRequest, TrainingStopped, run_training

    overrides = {**parse_sets(sets), **{key: value for key, value in flags.items() if value is not None}}
    request = RunRequest(
        cache=cache,
        config=config,
        run_dir=run_dir,
        resume=resume,
        max_steps=max_steps,
        overrides=overrides,
        task=Task(task_name),
    )
    try:
        report = run_training(request)
    except torch.cuda.OutOfMemoryError:
        raise SaltUsageError(
            "a training batch does not fit in GPU memory: lower train.batch_size (--set train.batch_size=N) "
            "or set model.grad_checkpointing=true; checkpoints written so far are kept "
            "(continue with --resume)"
        ) from None
    except (TrainingStopped, LostPeer, CheckpointWriteError) as exc:
        print(f"salt-train{rank_tag()}: error: {exc}", file=sys.stderr)
        return EXIT_PROBLEMS
    except OSError as exc:
        raise SaltUsageError(f"{exc.filename or 'run folder'}: {exc.strerror or exc}") from None
    if report.interrupted:
        return 128 + report.stop_signal if report.stop_signal else EXIT_STOPPED  # SIGTERM: 143
    if is_console_rank():
        print(f"run folder: {report.run_dir}")
    return EXIT_OK


@app.command("eval")
def evaluate(
    target: Path = typer.Argument(
        ..., help="a run folder (its newest checkpoint, else its export) or an exported encoder folder"
    ),
    val_cache: Path | None = typer.Option(
        None,
        "--val-cache",
        help="store of held-out clips (salt-cache build --split validation) [from the recipe: eval.val_cache]",
    ),
    train_cache: Path | None = typer.Option(
        None, "--train-cache", help="store the probes learn from [the run's own store]"
    ),
    checkpoint: str | None = typer.Option(
        None, "--checkpoint", help="a kept checkpoint of the run (step-00000500, or its path)"
    ),
    teacher: str | None = typer.Option(
        None,
        "--teacher",
        help="the store's teacher (hub id or folder): runs it on the transformed "
        "clips for the temporal probes' upper reference [not run]",
    ),
    train_rows: int | None = typer.Option(
        None, "--train-rows", help=f"train rows the probes learn on [eval.train_rows: {_DEFAULTS.eval.train_rows}]"
    ),
    val_rows: int | None = typer.Option(
        None, "--val-rows", help=f"validation rows they are scored on [eval.val_rows: {_DEFAULTS.eval.val_rows}]"
    ),
    pipeline: str | None = typer.Option(
        None, help="recipe for the eval settings of a bare export [ssv2]; a run folder uses its own"
    ),
    out: Path | None = typer.Option(None, "--out", help="output folder [TARGET/eval]"),
    device: Device | None = typer.Option(None, help=DEVICE_HELP),
    sets: list[str] = typer.Option([], "--set", help="override an eval field, e.g. --set eval.probe_epochs=40"),
    protocol: EvalProtocol = typer.Option(
        "fast",
        help="fast: the table below, on cached views (minutes); vjepa: "
        "V-JEPA's frozen SSv2 protocol (16x2x3, the whole splits decoded again each "
        "epoch: hours on GPUs, figures comparable with published ones; eval.vjepa.*), "
        "into TARGET/eval-vjepa/",
    ),
    profile: bool = typer.Option(
        False,
        "--profile",
        help="fast protocol: sample it with torch.profiler and write where the time goes, phase by phase "
        "(eval/profile.txt, eval.json 'profile', a gzipped chrome trace per phase)",
    ),
) -> int:
    """Measure an encoder: held-out distillation loss and per-channel R^2 (beside a mean-latent baseline), temporal
    probes (arrow of time, order, continuity; stride and clip retrieval as sanity checks), SSv2 attentive and
    linear probes; in columns pixels (no encoder: the floor), random-init, student and teacher, each probe the mean
    of eval.probe_seeds seeds with a 95% interval over validation rows and seeds. The validation store must be held out
    (another split, no shared clip). Writes eval/eval.json and eval/eval.png and prints the table."""
    setup_logging()
    from salt_train.eval.command import EvalRequest, run_eval

    overrides = parse_sets(sets)
    for key in overrides:
        if not key.startswith("eval."):
            raise SaltUsageError(f"--set {key}: eval takes eval.* fields only (the model's recipe is the run's)")
    if train_rows is not None:
        overrides["eval.train_rows"] = train_rows
    if val_rows is not None:
        overrides["eval.val_rows"] = val_rows
    # The recipe (a run folder's own, else --pipeline) and these overrides are checked once, by the protocol's
    # subject_config (salt_train/eval/command.py), with the recipe's messages.
    request = EvalRequest(
        target=target,
        val_cache=val_cache,
        train_cache=train_cache,
        checkpoint=checkpoint,
        teacher=teacher,
        pipeline=pipeline,
        overrides=overrides,
        device=device.value if device else None,
        out=out,
        profile=profile,
    )
    if protocol.value == "vjepa":
        from salt_train.eval.vjepa.command import run_vjepa

        if teacher:
            raise SaltUsageError(
                "--teacher runs the teacher for the fast protocol's temporal column; --protocol "
                "vjepa evaluates the encoder alone"
            )

        parent_death.install()  # its decoding workers die with this process
        run_vjepa(request)
        return EXIT_OK
    run_eval(request)
    return EXIT_OK


@app.command("import-encoder")
def import_encoder(
    source: Path = typer.Argument(
        ..., help="a V-JEPA checkpoint (.pth.tar, e.g. vitl16.pth.tar) or a VideoMAE save_pretrained folder"
    ),
    out: Path = typer.Argument(..., help="new folder for the exported encoder (pass it to salt-train eval)"),
    key: str = typer.Option("target_encoder", help="V-JEPA: the checkpoint entry holding the encoder"),
    heads: int | None = typer.Option(
        None, min=1, help="V-JEPA: attention heads [inferred for V-JEPA's widths 192, 384, 768, 1024, 1280, 1408]"
    ),
    uniform_power: bool = typer.Option(
        True,
        "--uniform-power/--no-uniform-power",
        help="V-JEPA without pos_embed in the file: how its sin-cos positions "
        "were laid out [uniform power, as V-JEPA's released configs]",
    ),
) -> int:
    """Convert a released encoder into salt-train's export format, so that salt-train eval measures it as it
    measures a student (calibration against published figures). Read without pickle code; every tensor is
    checked (a missing, unexpected or misshapen one is named, exit 2)."""
    setup_logging()
    from salt_train.import_encoder import import_encoder as convert

    done = convert(source, out, key=key, heads=heads, uniform_power=uniform_power)
    kwargs = done.kwargs
    norm = "final norm" if kwargs.get("final_norm", True) else "no final norm"
    print_block(
        f"imported {source} -> {out}",
        {
            "encoder": f"{done.layout}: width {kwargs['embed_dim']}, {kwargs['depth']} blocks, {kwargs['num_heads']} "
            f"heads, MLP x{kwargs['mlp_ratio']:.3g}, {norm}, LayerNorm eps {done.layer_norm_eps:g}",
            "converted": f"{done.tensors} tensors"
            + (f"; left out: {len(done.left_out)} head/decoder tensors" if done.left_out else ""),
            "positions": done.positions,
            "use it": f"salt-train eval {out} --train-cache TRAIN_STORE --val-cache VAL_STORE",
        },
        stream=sys.stdout,
    )
    return EXIT_OK


@app.command()
def preflight(
    cache: Path = typer.Option(..., "--cache", help="the store to check"),
    pipeline: str | None = typer.Option(None, help="recipe YAML or name in pipelines/ [ssv2]"),
    batches: int = typer.Option(30, min=1, help="batches for the worker stress test"),
    device: Device | None = typer.Option(None, help=DEVICE_HELP),
    sets: list[str] = typer.Option([], "--set", help=SET_HELP),
) -> int:
    """Checks to run before a long run: one batch's shapes and values, a worker stress test, /dev/shm use."""
    setup_logging()
    parent_death.install()
    from salt_train.preflight import run_preflight

    config = _config(pipeline, sets, device)
    results = run_preflight(cache, config, stress_batches=batches)
    return EXIT_OK if all(r.passed for r in results) else EXIT_PROBLEMS


@app.command()
def bench(
    cache: Path = typer.Option(..., "--cache", help="a store to read"),
    pipeline: str | None = typer.Option(None, help="recipe YAML or name in pipelines/ [ssv2]"),
    batches: int = typer.Option(20, min=2, help="batches per measurement"),
    synthetic: int | None = typer.Option(
        None,
        "--synthetic",
        min=1,
        help="first write a store of N rows of the production shape (random "
        "D=1280 latents, no teacher) at --cache, if none is there",
    ),
    device: Device | None = typer.Option(None, help=DEVICE_HELP),
    sets: list[str] = typer.Option([], "--set", help=SET_HELP),
    json_out: Path | None = typer.Option(None, "--json", help="also write the figures as numbers to this file"),
    profile: Path | None = typer.Option(
        None, "--profile", help="write a torch.profiler trace of a few steps into this folder (chrome trace JSON)"
    ),
) -> int:
    """Print throughput: loader vs raw file reads, training step with the loader vs from memory, FLOPs per clip,
    TFLOP/s and the fraction of the GPU's peak.

    Under torchrun (torchrun --nproc-per-node=K -m salt_train bench ...) each rank runs its loader and
    its DDP step on its slice of the global batch at once: the figures are the job's totals."""
    setup_logging()
    parent_death.install()
    from shared.device import resolve_device
    from shared.distributed import backend_for, distributed

    from salt_train.bench import run_bench, write_synthetic_store

    config = _config(pipeline, sets, device)
    if synthetic and not cache.exists() and is_console_rank():
        write_synthetic_store(cache, synthetic)
    with distributed(backend_for(resolve_device(config.train.device, "train.device"))) as dist:
        dist.barrier()  # the synthetic store is written
        figures, numbers = run_bench(cache, config, batches=batches, dist=dist, profile=profile)
    print_block("salt-train bench", figures, stream=sys.stdout)
    if json_out is not None and is_console_rank():
        json_out.write_text(json.dumps(numbers, indent=1))
    return EXIT_OK


@app.command()
def scaling(
    cache: Path = typer.Option(..., "--cache", help="a store to read"),
    pipeline: str | None = typer.Option(None, help="recipe YAML or name in pipelines/ [ssv2]"),
    processes: int = typer.Option(2, min=2, help="measure 1, 2, ... N torchrun processes on this machine"),
    threads: int = typer.Option(1, min=1, help="intra-op threads per process (OMP_NUM_THREADS)"),
    batches: int = typer.Option(20, min=2, help="batches per measurement"),
    device: Device | None = typer.Option(None, help=DEVICE_HELP),
    sets: list[str] = typer.Option([], "--set", help=SET_HELP),
) -> int:
    """Scaling efficiency of the loader and the DDP step from 1 to N processes (same global batch)."""
    setup_logging()
    from salt_train.bench_scaling import run_scaling, scaling_table

    _require_store_dir(cache)
    _config(pipeline, sets, device)  # a bad recipe is refused here, not N times below
    bench_args = [
        "--cache",
        str(cache),
        "--batches",
        str(batches),
        *(["--pipeline", pipeline] if pipeline else []),
        *(["--device", device.value] if device else []),
        *(arg for item in sets for arg in ("--set", item)),
    ]
    results = run_scaling(processes, threads, bench_args)
    print(f"== salt-train scaling: same global batch {int(results[0]['batch'])}, {threads} thread(s) per process")
    for line in scaling_table(results):
        print(f"  {line}")
    return EXIT_OK


def _require_store_dir(cache: Path) -> None:
    if not cache.is_dir():
        raise SaltUsageError(f"store {cache} does not exist (or is not a folder)")


@snapshots_app.command("list")
def snapshots_list(cache: Path = typer.Option(..., "--cache", help="the live store")) -> int:
    """Snapshots of a store: name, mode, files, size, creation time."""
    setup_logging()
    from salt_train.snapshot import list_snapshots

    _require_store_dir(cache)
    found = list_snapshots(cache)
    if not found:
        print(f"no snapshots of {cache}")
    for item in found:
        print(
            f"{item['name']}  {item['mode']}  {item['files']} files  {item['bytes']} bytes  "
            f"{item['created']}  {item['path']}"
        )
    return EXIT_OK


@snapshots_app.command("prune")
def snapshots_prune(
    cache: Path = typer.Option(..., "--cache", help="the live store"),
    keep: int = typer.Option(0, min=0, help="keep the newest N snapshots"),
    names: list[str] = typer.Option([], "--name", help="remove only these snapshots (repeatable)"),
) -> int:
    """Remove old snapshots (and leftovers of interrupted ones).
    A reflink snapshot frees only what the live store no longer shares."""
    setup_logging()
    from salt_train.snapshot import prune_snapshots

    _require_store_dir(cache)
    removed = prune_snapshots(cache, keep=keep, names=names or None)
    print(f"removed {len(removed)} snapshot(s)" + (f": {', '.join(removed)}" if removed else ""))
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    return run_app(app, "salt-train", argv)


if __name__ == "__main__":
    sys.exit(main())
