"""int4 weights in groups (CPU only): torch's packed int4 kernel, a bf16 scale and zero per group.

Groups of 32 inputs (GGUF's Q4 block): 5 bits a weight in all. quantize.py decides which layers
take it (every Linear its packing can: outputs in multiples of 16, inputs of INT4_GROUP).
"""

from __future__ import annotations

import torch
import torch.nn as nn

# int4 weights share a scale and zero per group of this many inputs. Random full-size weights,
# 20 frames, against bf16 (top-1, mean KL): groups of 128 0.166 / 0.100, of 32 0.278 / 0.069;
# the depth decoder alone in int4 (the rest fp32) 0.495 / 0.022.
INT4_GROUP = 32


def int4_fits(layer: nn.Linear) -> bool:
    """torch's int4 packing needs outputs in multiples of 16 and inputs of 32."""
    n, k = layer.weight.shape
    return n % 16 == 0 and k % INT4_GROUP == 0


class Int4Linear(nn.Module):
    """CPU only: torch's packed int4 kernel with bf16 activations inside the layer."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        w = weight.detach().float().cpu()
        n, k = w.shape
        group = INT4_GROUP
        g = w.view(n, k // group, group)
        low, high = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
        scale = (high - low).clamp(min=1e-12) / 15
        zero = low + 8 * scale  # torch's convention: w = (q - 8) * scale + zero
        q = ((g - low) / scale).round().clamp(0, 15).to(torch.int32).view(n, k)
        self.out_features, self.in_features, self.group = n, k, group
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 8))
        sz = torch.stack([scale.squeeze(-1), zero.squeeze(-1)], dim=-1).transpose(0, 1)
        self.register_buffer("scale_zero", sz.contiguous().bfloat16())  # [k / group, n, 2]

    def forward(self, x):
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.reshape(-1, self.in_features).bfloat16(), self.packed, self.group,
            self.scale_zero.bfloat16())  # (a no-op unless a model.to(dtype) changed it)
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def dequantized(self) -> torch.Tensor:
        """The weight this layer multiplies by, in float32 (read back through the kernel)."""
        return self(torch.eye(self.in_features)).float().T
