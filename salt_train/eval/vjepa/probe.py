"""The probe of the protocol: V-JEPA's attentive classifier over the tokens of all of a video's clips.

It is :class:`salt_train.eval.probes.AttentiveProbe` (one learned query cross-attends to every token, an
MLP with a residual, a linear head) with the encoder's own head count, as V-JEPA's ``AttentiveClassifier``
(depth 1). With ``attend_across_segments`` the query attends to the 2 clips' tokens at once (2 x 1568
for 16 frames), so the probe can relate what happens in one clip to the other; the encoder adds no
position telling the clips apart (V-JEPA's ``ClipAggregation`` without ``use_pos_embed``). A validation
video is scored once per spatial view and the softmax is averaged over the views.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from salt_train.eval.probes import AttentiveProbe


def build_probe(width: int, classes: int, heads: int, seed: int) -> AttentiveProbe:
    """The probe, its initial weights a function of ``seed`` only (the global generator is left alone)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AttentiveProbe(width, classes, heads)


def view_logits(probe: nn.Module, inputs: Tensor) -> Tensor:
    """``[views, B, clips * N, width]`` (:func:`views.probe_inputs`) -> logits ``[views, B, classes]``."""
    views, videos = inputs.shape[:2]
    return probe(inputs.flatten(0, 1)).reshape(views, videos, -1)


def averaged_softmax(logits: Tensor) -> Tensor:
    """Per-view logits ``[views, B, classes]`` -> the mean of their softmax ``[B, classes]`` (in float32)."""
    return F.softmax(logits.float(), dim=-1).mean(dim=0)


def top_k_correct(probabilities: Tensor, labels: Tensor, k: int) -> Tensor:
    """Per video: whether its label is among the ``k`` most probable classes."""
    k = min(k, probabilities.shape[1])
    return (probabilities.topk(k, dim=1).indices == labels[:, None]).any(dim=1)
