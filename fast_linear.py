"""Linear layers made for speed, swapped into a built model in place (same parameters).

- `PackedLinear`: fp32 weights also prepacked by MKL for the engine's batch size (CPU).

Each swap is undone by its inverse; torch.compile traces plain nn.Linear layers.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class PackedLinear(nn.Module):
    """nn.Linear with its weight also prepacked by MKL for `batch` rows (CPU, fp32).

    Skinny matrix products (a few streams x a big weight) run ~2.5x faster packed on CPU; calls
    with another row count fall back to the plain weight inside the same MKL op, exactly.
    """

    def __init__(self, linear: nn.Linear, batch: int):
        super().__init__()
        self.weight = linear.weight  # same parameter, same state-dict key
        self.batch = batch
        self.register_buffer("packed", torch.ops.mkl._mkl_reorder_linear_weight(self.weight, batch),
                             persistent=False)

    def forward(self, x):
        return torch.ops.mkl._mkl_linear(x, self.packed, self.weight, None, self.batch)


def can_prepack(model: nn.Module) -> bool:
    p = next(model.parameters())
    return p.device.type == "cpu" and p.dtype == torch.float32 and torch._C.has_mkl


def swap_layers(model: nn.Module, swap) -> int:
    """Replace each child module m by swap(m) where that gives a new module; count the swaps."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            new = swap(child)
            if new is not child:
                setattr(parent, name, new)
                count += 1
    return count


def _plain_linear(layer: PackedLinear) -> nn.Linear:
    lin = nn.Linear(layer.weight.shape[1], layer.weight.shape[0], bias=False, device="meta")
    lin.weight = layer.weight
    return lin


@torch.no_grad()
def prepack_linears(model: nn.Module, batch: int) -> int:
    """Swap every Linear of the frame step for a PackedLinear sized for `batch` rows."""
    if batch < 2 or not can_prepack(model):
        return 0

    def swap(m):
        if isinstance(m, nn.Linear):
            return PackedLinear(m, batch)
        if isinstance(m, PackedLinear) and m.batch != batch:
            return PackedLinear(_plain_linear(m), batch)
        return m

    return swap_layers(model, swap)


def unpack_linears(model: nn.Module) -> int:
    """Undo prepack_linears (torch.compile traces plain Linear layers, not MKL's packed op)."""
    return swap_layers(model, lambda m: _plain_linear(m) if isinstance(m, PackedLinear) else m)
