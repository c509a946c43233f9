"""The attentive probe per seed on features dumped by ``dump_features.py``, at the settings named.

    python -m benchmarks.demo_probes.probe_sweep FEATURES.pt --settings 2e-2,60 3e-3,60 [--columns student]

Each setting is ``lr,epochs[,weight_decay[,batch]]`` (weight decay 0.01 and batch 8 by default: the demo
recipe's); one line per setting and column: top-1 (%) for probe seeds 0, 1, 2 and their mean.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from salt_train.eval.probes import ProbeSettings, attentive_probe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("features")
    parser.add_argument("--settings", nargs="+", default=["2e-2,60"])
    parser.add_argument("--columns", nargs="+", default=["pixels", "random_init", "student", "teacher"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    dumped = torch.load(args.features, weights_only=False)
    train_y, val_y = dumped[("train", "y")], dumped[("val", "y")]
    classes = int(max(train_y.max(), val_y.max())) + 1
    for spec in args.settings:
        parts = spec.split(",")
        lr, epochs = float(parts[0]), int(parts[1])
        weight_decay = float(parts[2]) if len(parts) > 2 else 0.01
        batch = int(parts[3]) if len(parts) > 3 else 8
        for column in args.columns:
            if ("train", column) not in dumped:
                continue
            train, val = dumped[("train", column)].float(), dumped[("val", column)].float()
            top1 = []
            for seed in (0, 1, 2):
                settings = ProbeSettings(epochs, lr, weight_decay, batch, seed, torch.device("cpu"))
                score = attentive_probe(
                    lambda ids, t=train: t[ids],
                    train_y,
                    lambda ids, v=val: v[ids],
                    val_y,
                    train.shape[2],
                    classes,
                    settings,
                    dumped["heads"][column],
                )
                top1.append(round(100 * score.top1, 1))
            print(
                f"lr={lr} epochs={epochs} wd={weight_decay} batch={batch} {column:12s} {top1} mean={np.mean(top1):.1f}"
            )


if __name__ == "__main__":
    main()
