"""Write a random-weight checkpoint in the original VideoMAE release's pretraining layout.

For measuring ``salt-cache convert-teacher`` (and the converted teacher) at real size without
downloading the release: ``python -m tests.original_videomae_checkpoint OUT.pth [--size huge]``.
Its encoder keys come from the converter's own list (the tests check that list against a
model written in the original layout); the decoder is a few tensors, left out by the converter.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from salt_cache.convert_teacher import original_encoder_keys

SIZES = {"base": (768, 12), "large": (1024, 24), "huge": (1280, 32)}  # width, depth (MLP 4x width)
DECODER_WIDTH = {"base": 384, "large": 512, "huge": 640}


def random_original_state(size: str, seed: int = 0) -> dict[str, torch.Tensor]:
    width, depth = SIZES[size]
    shapes = {
        "patch_embed.proj.weight": (width, 3, 2, 16, 16),
        "attn.qkv.weight": (3 * width, width),
        "attn.proj.weight": (width, width),
        "mlp.fc1.weight": (4 * width, width),
        "mlp.fc1.bias": (4 * width,),
        "mlp.fc2.weight": (width, 4 * width),
    }
    generator = torch.Generator().manual_seed(seed)

    def tensor(key: str) -> torch.Tensor:
        shape = next((s for suffix, s in shapes.items() if key.endswith(suffix)), (width,))  # norms and biases
        norm_scale = key.endswith(".weight") and "norm" in key.split(".")[-2]  # near 1, as a trained norm's
        return torch.randn(shape, generator=generator) * 0.02 + (1.0 if norm_scale else 0.0)

    state = {key: tensor(key) for key in original_encoder_keys(depth, qkv_bias=True)}
    dec = DECODER_WIDTH[size]
    state |= {
        f"decoder.blocks.{i}.attn.qkv.weight": torch.randn(3 * dec, dec, generator=generator) * 0.02 for i in range(4)
    }
    state |= {
        "decoder.head.weight": torch.zeros(1536, dec),
        "encoder_to_decoder.weight": torch.zeros(dec, width),
        "mask_token": torch.zeros(1, 1, dec),
    }
    return state


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--size", choices=sorted(SIZES), default="huge")
    args = parser.parse_args(argv)
    state = random_original_state(args.size)
    start = time.perf_counter()
    # As the original training script saves it: weights under "model", beside the epoch and its args.
    torch.save(
        {"model": state, "epoch": 1599, "args": argparse.Namespace(model=f"pretrain_videomae_{args.size}")}, args.out
    )
    print(
        f"{args.out}: {sum(v.numel() for v in state.values()) / 1e6:.0f} M values, "
        f"written in {time.perf_counter() - start:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
