"""Probes on frozen features: V-JEPA's attentive probe, a linear probe, top-1 retrieval.

Every probe is a pure function of its features, labels and seed: its weights
are drawn and its batches shuffled from generators seeded with ``seed`` (the
global torch generator is left as it was), so the same inputs give the same
numbers on CPU.

- :class:`AttentiveProbe` (V-JEPA's ``AttentiveClassifier``): one learned
  query cross-attends to all tokens, then an MLP with a residual, then a
  linear head. Trained with AdamW, linear warmup then cosine decay.
- :func:`linear_probe`: features standardised with the training set's mean
  and std (MAE's batch-norm-without-affine), then multinomial logistic
  regression fitted by full-batch L-BFGS (convex: no learning rate to tune).
- :func:`retrieval_top1`: cosine nearest neighbour between two views of the
  same clips; no training.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from salt_train.eval.profile import tick

# Reads rows ``ids`` (sorted int64) of a feature table as float32 on a device.
RowReader = Callable[[np.ndarray], Tensor]


@dataclass(frozen=True)
class ProbeSettings:
    epochs: int
    lr: float
    weight_decay: float
    batch_size: int
    seed: int
    device: torch.device


@dataclass(frozen=True)
class ProbeScore:
    top1: float
    top5: float | None  # None where there are 5 classes or fewer
    chance: float
    samples: int
    correct: tuple[bool, ...] = ()  # per sample: top-1 right (for intervals over rows)
    correct5: tuple[bool, ...] | None = None  # per sample: in the top 5 (more than 5 classes only)


def attention_heads(width: int, wanted: int = 16) -> int:
    """``wanted`` heads where the width allows, else the largest divisor of ``width`` below it.
    V-JEPA's probe takes the encoder's own head count (ViT-B 12, ViT-L and ViT-H 16)."""
    return max(h for h in range(1, wanted + 1) if width % h == 0)


class AttentiveProbe(nn.Module):
    """One learned query, one cross-attention block with an MLP, a linear head."""

    def __init__(self, width: int, classes: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.heads = attention_heads(width, heads)
        self.query = nn.Parameter(torch.zeros(1, 1, width))
        nn.init.trunc_normal_(self.query, std=0.02)
        self.norm_tokens = nn.LayerNorm(width)
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.proj = nn.Linear(width, width)
        self.norm_mlp = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))
        self.head = nn.Linear(width, classes)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward(self, tokens: Tensor) -> Tensor:
        """``[B, N, width]`` tokens -> ``[B, classes]`` logits."""
        batch, count, width = tokens.shape
        head_dim = width // self.heads
        x = self.norm_tokens(tokens)
        k, v = self.kv(x).view(batch, count, 2, self.heads, head_dim).permute(2, 0, 3, 1, 4)
        q = self.q(self.query).view(1, self.heads, 1, head_dim).expand(batch, -1, -1, -1)
        pooled = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, 1, width)
        x = self.query + self.proj(pooled)
        x = x + self.mlp(self.norm_mlp(x))
        return self.head(x[:, 0])


def _lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train_classifier(model: nn.Module, read: RowReader, labels: np.ndarray, settings: ProbeSettings) -> nn.Module:
    """AdamW on cross-entropy over ``len(labels)`` training rows, seeded batches, warmup then cosine."""
    model.to(settings.device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    rows = len(labels)
    batch = min(settings.batch_size, rows)
    steps_per_epoch = math.ceil(rows / batch)
    total = settings.epochs * steps_per_epoch
    warmup = max(1, total // 10)
    order_rng = np.random.default_rng(np.random.SeedSequence([settings.seed, 11]))
    targets = torch.as_tensor(labels, dtype=torch.long)
    step = 0
    for _ in range(settings.epochs):
        order = order_rng.permutation(rows)
        for start in range(0, rows, batch):
            ids = np.sort(order[start : start + batch])
            for group in optimizer.param_groups:
                group["lr"] = settings.lr * _lr_factor(step, total, warmup)
            loss = F.cross_entropy(model(read(ids)), targets[ids].to(settings.device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            tick()
    return model.eval()


@torch.no_grad()
def score_classifier(
    model: nn.Module, read: RowReader, labels: np.ndarray, classes: int, batch_size: int
) -> ProbeScore:
    """Top-1 (and top-5 where there are more than 5 classes) accuracy over every row."""
    right1: list[bool] = []
    right5: list[bool] = []
    for start in range(0, len(labels), batch_size):
        ids = np.arange(start, min(start + batch_size, len(labels)))
        logits = model(read(ids)).float().cpu()
        truth = torch.as_tensor(labels[ids], dtype=torch.long)
        ranked = logits.topk(min(5, classes), dim=1).indices
        right1 += (ranked[:, 0] == truth).tolist()
        right5 += (ranked == truth[:, None]).any(dim=1).tolist()
    n = max(1, len(labels))
    return ProbeScore(
        sum(right1) / n,
        sum(right5) / n if classes > 5 else None,
        1 / classes,
        len(labels),
        tuple(right1),
        tuple(right5) if classes > 5 else None,
    )


ModuleT = TypeVar("ModuleT", bound=nn.Module)


def _seeded(seed: int, build: Callable[[], ModuleT]) -> ModuleT:
    """A module whose initial weights depend on ``seed`` alone, leaving the global generator as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def attentive_probe(
    train: RowReader,
    train_labels: np.ndarray,
    val: RowReader,
    val_labels: np.ndarray,
    width: int,
    classes: int,
    settings: ProbeSettings,
    heads: int,
) -> ProbeScore:
    """V-JEPA's attentive probe on frozen tokens ``[rows, N, width]``, with the encoder's ``heads``; in bf16
    autocast on CUDA (fp32 weights and optimiser, as V-JEPA's eval), fp32 elsewhere."""
    probe = _seeded(settings.seed, lambda: AttentiveProbe(width, classes, heads))
    device = settings.device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        train_classifier(probe, train, train_labels, settings)
        return score_classifier(probe, val, val_labels, classes, settings.batch_size)


def linear_probe(
    train_features: Tensor,
    train_labels: np.ndarray,
    val_features: Tensor,
    val_labels: np.ndarray,
    classes: int,
    settings: ProbeSettings,
) -> ProbeScore:
    """Multinomial logistic regression on ``[rows, F]`` features standardised with the training rows'
    statistics: full-batch L-BFGS with an L2 penalty of ``weight_decay`` (a convex problem, so the
    result depends on neither a learning rate nor the number of rows). ``epochs`` is L-BFGS's
    iteration bound; ``lr`` is unused."""
    device = settings.device
    train_features = train_features.float().to(device)
    mean = train_features.mean(0, keepdim=True)
    std = train_features.std(0, keepdim=True, unbiased=False).clamp_min(1e-6)
    train_x = (train_features - mean) / std
    val_x = (val_features.float().to(device) - mean) / std
    targets = torch.as_tensor(train_labels, dtype=torch.long, device=device)
    probe = _seeded(settings.seed, lambda: nn.Linear(train_x.shape[1], classes)).to(device)
    optimizer = torch.optim.LBFGS(
        probe.parameters(), lr=1.0, max_iter=settings.epochs, history_size=20, line_search_fn="strong_wolfe"
    )

    def closure() -> Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(probe(train_x), targets) + settings.weight_decay * probe.weight.square().sum()
        loss.backward()
        tick()
        return loss

    optimizer.step(closure)
    return score_classifier(
        probe.eval(), lambda ids: val_x[torch.as_tensor(ids, device=device)], val_labels, classes, settings.batch_size
    )


def retrieval_top1(queries: Tensor, keys: Tensor) -> ProbeScore:
    """Share of query ``i`` whose cosine nearest key is key ``i`` (chance: 1/rows)."""
    q = F.normalize(queries.float(), dim=1)
    k = F.normalize(keys.float(), dim=1)
    nearest = (q @ k.T).argmax(dim=1).cpu()
    rows = len(queries)
    right = (nearest == torch.arange(rows)).tolist()
    return ProbeScore(sum(right) / rows if rows else 0.0, None, 1 / max(1, rows), rows, tuple(right))


def stack_tasks(features: dict[str, Tensor], classes: Sequence[str]) -> tuple[Tensor, np.ndarray]:
    """The samples of one temporal task: each class's variant features, labelled with its index."""
    stacked = torch.cat([features[name] for name in classes])
    labels = np.concatenate([np.full(len(features[name]), k, dtype=np.int64) for k, name in enumerate(classes)])
    return stacked, labels
