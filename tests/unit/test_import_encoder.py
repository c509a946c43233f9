"""`salt-train import-encoder`: released V-JEPA and VideoMAE encoders into the export format.

Tiny random encoders in each source's own layout; the converted export, loaded as `salt-train eval`
loads it (`load_encoder`), must give the source's own forward (V-JEPA: a hand-written functional
forward of the same tensors, tests/vjepa_checkpoint.py; VideoMAE: transformers' `VideoMAEModel`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import VideoMAEConfig, VideoMAEModel

from salt_train.export import load_encoder
from tests.conftest import call_train
from tests.vjepa_checkpoint import vjepa_encoder_state, vjepa_forward, vjepa_sincos, write_vjepa_checkpoint

WIDTH, DEPTH, HEADS = 32, 2, 2


def _pixels(frames: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randn(1, 3, frames, 224, 224, generator=torch.Generator().manual_seed(seed))


def _import(source: Path, out: Path, *args: str) -> str:
    result = call_train("import-encoder", source, out, *args)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.mark.parametrize("with_pos,uniform_power", [(True, True), (False, True), (False, False)])
def test_a_vjepa_checkpoint_converts_to_its_own_forward(tmp_path: Path, with_pos: bool, uniform_power: bool) -> None:
    state = vjepa_encoder_state(WIDTH, DEPTH, with_pos=with_pos, uniform_power=uniform_power)
    checkpoint = write_vjepa_checkpoint(tmp_path / "vitt16.pth.tar", state)
    flags = ["--heads", str(HEADS)] + ([] if uniform_power else ["--no-uniform-power"])
    output = _import(checkpoint, tmp_path / "export", *flags)
    assert f"{len(state)} tensors" in output, output  # every key of the target encoder is used
    positions = torch.from_numpy(vjepa_sincos(WIDTH, uniform_power)).float()
    encoder = load_encoder(tmp_path / "export").eval()
    pixels = _pixels()
    with torch.no_grad():
        want = vjepa_forward(state, pixels, HEADS, positions)
        assert torch.allclose(encoder(pixels), want, atol=1e-5, rtol=1e-4)
        # Fewer frames keep the first time slots' positions (load_encoder's rule), as the reference does.
        few = _pixels(4)
        assert torch.allclose(
            load_encoder(tmp_path / "export", num_frames=4).eval()(few),
            vjepa_forward(state, few, HEADS, positions),
            atol=1e-5,
            rtol=1e-4,
        )
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["source"]["layout"] == "vjepa" and config["kwargs"]["num_heads"] == HEADS
    if not with_pos:
        assert "rebuilt" in config["source"]["positions"]


@pytest.mark.parametrize("final_norm", [True, False])
def test_a_videomae_folder_converts_to_its_own_forward(tmp_path: Path, final_norm: bool) -> None:
    config = VideoMAEConfig(
        image_size=224,
        patch_size=16,
        num_channels=3,
        num_frames=16,
        tubelet_size=2,
        hidden_size=WIDTH,
        num_hidden_layers=DEPTH,
        num_attention_heads=HEADS,
        intermediate_size=3 * WIDTH,
        use_mean_pooling=not final_norm,
    )  # layer_norm_eps 1e-12
    torch.manual_seed(0)
    model = VideoMAEModel(config)
    with torch.no_grad():  # every tensor random (LayerNorms and biases too): a swapped mapping would show
        for name, tensor in model.named_parameters():
            tensor.copy_(
                torch.randn_like(tensor) * (0.2 if "weight" in name else 0.05)
                + (1.0 if "layernorm" in name and name.endswith("weight") else 0.0)
            )
    model.save_pretrained(tmp_path / "videomae")
    output = _import(tmp_path / "videomae", tmp_path / "export")
    assert f"{len(model.state_dict())} tensors" in output, output
    assert ("no final norm" in output) != final_norm and "1e-12" in output
    reference = VideoMAEModel.from_pretrained(tmp_path / "videomae").eval()
    pixels = _pixels()
    with torch.no_grad():
        want = reference(pixel_values=pixels.transpose(1, 2)).last_hidden_state  # VideoMAE takes [B, T, C, H, W]
        got = load_encoder(tmp_path / "export").eval()(pixels)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), (got - want).abs().max()


def _refused(*args: str | Path) -> str:
    result = call_train("import-encoder", *args)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_bad_sources_are_one_line_and_exit_2(tmp_path: Path) -> None:
    good = vjepa_encoder_state(WIDTH, DEPTH)
    out = tmp_path / "out"

    def checkpoint(name: str, state: dict) -> Path:
        return write_vjepa_checkpoint(tmp_path / name, state)

    missing = {k: v for k, v in good.items() if k != "blocks.1.mlp.fc2.bias"}
    assert "lacks blocks.1.mlp.fc2.bias" in _refused(checkpoint("missing.pth.tar", missing), out)
    extra = good | {"blocks.0.attn.rel_pos": torch.zeros(3)}
    assert "unexpected key blocks.0.attn.rel_pos" in _refused(checkpoint("extra.pth.tar", extra), out)
    wrong = good | {"blocks.0.mlp.fc1.weight": torch.zeros(4 * WIDTH, WIDTH + 1)}
    assert "blocks.0.mlp.fc1.weight has shape (128, 33), expected (128, 32)" in _refused(
        checkpoint("shape.pth.tar", wrong), out, "--heads", "2"
    )
    other_geometry = good | {"patch_embed.proj.weight": torch.zeros(WIDTH, 3, 1, 16, 16)}
    assert "not a Conv3d of 2x16x16" in _refused(checkpoint("geometry.pth.tar", other_geometry), out)
    big = good | {"pos_embed": torch.zeros(1, 4608, WIDTH)}  # 384 px
    assert "pos_embed has shape (1, 4608, 32)" in _refused(checkpoint("384.pth.tar", big), out, "--heads", "2")
    nan = good | {"norm.bias": torch.full((WIDTH,), float("nan"))}
    assert "non-finite weight" in _refused(checkpoint("nan.pth.tar", nan), out, "--heads", "2")
    assert "pass --heads" in _refused(checkpoint("heads.pth.tar", good), out)  # width 32 is no V-JEPA size
    assert "no 'ema' entry" in _refused(checkpoint("key.pth.tar", good), out, "--key", "ema")
    assert "does not exist" in _refused(tmp_path / "nowhere.pth.tar", out)
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    assert "is not a PyTorch checkpoint" in _refused(tmp_path / "notes.txt", out)
    (tmp_path / "empty-folder").mkdir()
    assert "has no config.json" in _refused(tmp_path / "empty-folder", out)
    assert not out.exists()  # nothing written by any refusal

    _import(checkpoint("good.pth.tar", good), out, "--heads", "2")
    assert "already exists" in _refused(tmp_path / "good.pth.tar", out, "--heads", "2")


def test_a_videomae_folder_with_a_stray_or_missing_tensor_is_refused(tmp_path: Path) -> None:
    config = VideoMAEConfig(
        hidden_size=WIDTH, num_hidden_layers=1, num_attention_heads=HEADS, intermediate_size=2 * WIDTH
    )
    VideoMAEModel(config).save_pretrained(tmp_path / "videomae")
    weights = tmp_path / "videomae" / "model.safetensors"
    state = load_file(weights)
    save_file(
        state | {"encoder.layer.0.attention.attention.rel_pos": torch.zeros(3)}, weights, metadata={"format": "pt"}
    )
    assert "unexpected key encoder.layer.0.attention.attention.rel_pos" in _refused(
        tmp_path / "videomae", tmp_path / "out"
    )
    save_file({k: v for k, v in state.items() if "output.dense.bias" not in k}, weights, metadata={"format": "pt"})
    assert "lacks" in _refused(tmp_path / "videomae", tmp_path / "out")
    assert not (tmp_path / "out").exists()
