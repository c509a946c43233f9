"""Dump a run's frozen eval features (2x2-pooled tokens and labels per column) to a .pt file, to probe offline.

    python -m benchmarks.demo_probes.dump_features RUN VAL_STORE OUT.pt [--train-store S] [--columns ...] [--heldout]

The features are the ones `salt-train eval` computes (its ``extract`` and ``pool_tokens``, the recipe's rows and
seed), without the temporal variants; ``--heldout`` adds the student's held-out figures (R^2 per channel).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from salt_train.eval.command import (
    PIXELS,
    RANDOM,
    STUDENT,
    TEACHER,
    EvalRequest,
    open_subject_and_stores,
    random_init,
    subject_config,
    subject_target_norm,
)
from salt_train.eval.features import EncoderFeatures, ExtractionPlan, FeatureModel, extract, pool_tokens
from salt_train.eval.heldout import channel_means, heldout_figures
from salt_train.eval.pixels import PixelFeatures
from salt_train.eval.rows import row_set


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("val_store", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--train-store", type=Path, help="another train store than the run's (its teacher column)")
    parser.add_argument("--columns", nargs="+", default=[PIXELS, RANDOM, STUDENT], help="encoder columns to run")
    parser.add_argument("--heldout", action="store_true", help="also the student's held-out figures")
    args = parser.parse_args()

    request = EvalRequest(target=args.run, val_cache=args.val_store, train_cache=args.train_store)
    config = subject_config(request)
    subject, train_store, val_store = open_subject_and_stores(request, config, "a validation store")
    settings = subject.config.eval
    train_set = row_set(train_store, settings.train_rows, 0, settings.seed, "--train-rows")
    val_set = row_set(val_store, settings.val_rows, 0, settings.seed, "--val-rows")
    target_norm = subject_target_norm(subject)
    device = torch.device("cpu")
    random_encoder, _ = random_init(subject, val_store.teacher_width)
    available: dict[str, FeatureModel] = {
        PIXELS: PixelFeatures(PIXELS),
        RANDOM: EncoderFeatures(RANDOM, random_encoder, device),
        STUDENT: EncoderFeatures(STUDENT, subject.encoder, device),
    }
    models = {name: available[name] for name in args.columns}
    result: dict = {"heads": {name: model.heads for name, model in models.items()}}
    result["heads"][TEACHER] = int(train_store.attrs.get("teacher", {}).get("heads", 16))
    with tempfile.TemporaryDirectory() as spill:
        for label, store, rows in (("train", train_store, train_set), ("val", val_store, val_set)):
            plan = ExtractionPlan(rows.rows, np.zeros(len(rows.rows), bool), ("original",), True, settings.seed)
            features, latents = extract(
                store,
                plan,
                models,
                settings.batch_size,
                int(20e9),
                Path(spill),
                label,
                with_latents=True,
                target_norm=target_norm,
            )
            assert latents is not None  # with_latents=True
            features[TEACHER] = latents
            for name, column in features.items():
                assert column.tokens is not None  # keep_tokens=True
                tokens = column.tokens.read(np.arange(len(rows.rows)), device)
                result[(label, name)] = pool_tokens(tokens, 2).half()
            result[(label, "y")] = rows.labels
    if args.heldout:
        baseline = channel_means(train_store, train_set.rows, target_norm, settings.batch_size)
        result["heldout"] = heldout_figures(
            val_store,
            val_set.rows,
            subject.config.mask,
            subject.config.model.loss,
            device,
            settings.batch_size,
            settings.seed,
            {STUDENT: subject.student},
            target_norm,
            baseline,
        )
        print("held-out R^2 per channel:", result["heldout"][STUDENT].get("r2"))
    torch.save(result, args.out)
    print("saved", args.out)


if __name__ == "__main__":
    main()
