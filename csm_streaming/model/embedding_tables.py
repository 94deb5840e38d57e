"""A quantized model's embedding tables (model/quantize.py): the text table in int8 with a
scale per group of 32 values, the audio table in bf16.

Measured against bf16 on random full-size weights (bench_quantize.py, 50 frames, next-code
top-1 / mean KL of the int8 model): both tables in bf16 0.905 / 5.0e-4; the text table in int8
with a scale per row 0.898 / 6.5e-4, per group of 32 0.907 / 5.5e-4; both tables in int8 per
row 0.885 / 7.8e-4. The text table (128256 x 2048, 1.05 GB in fp32) is looked up once per
prompt token and grouped int8 keeps 0.29 GB of it (bf16: 0.53). The audio table's 32 rows are
summed into every frame's input, whose error every later layer and frame inherits (as the
backbone's first layers', TWO_PART_INT8): it stays bf16 (0.27 GB, the reference's rounding)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

EMBEDDING_GROUP = 32  # values sharing a scale in an int8 table's row


class Int8Embedding(nn.Module):
    """An embedding table in int8, a scale per EMBEDDING_GROUP values of a row (symmetric):
    1.125 bytes a value with the float32 scales, against fp32's 4, each row looked up handed
    out in the model's dtype. A value's rounding is at most its group's largest / 254 (a group
    of 32 Gaussian values peaks near 2.3 sigma, a row of 2048 near 3.9: 0.6x the error of one
    scale a row); a prompt looks up one text row a token, so the lookup's cost does not count."""

    def __init__(self, table: nn.Embedding, rows_at_once: int = 8192,
                 group: int = EMBEDDING_GROUP):
        super().__init__()
        w = table.weight.detach()
        self.num_embeddings, self.embedding_dim = rows, dim = w.shape
        if dim % group:
            raise ValueError(f"an int8 table's rows ({dim}) must divide into groups of {group}")
        q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
        scale = torch.empty(rows, dim // group, dtype=torch.float32, device=w.device)
        for first in range(0, rows, rows_at_once):  # a slice at a time: no full-size temporary
            part = w[first:first + rows_at_once].float().unflatten(1, (-1, group))  # [r, G, g]
            peak = torch.maximum(part.amax(2), part.amin(2).neg_()).clamp_(min=1e-12)
            step = scale[first:first + rows_at_once] = peak.div_(127)
            q[first:first + rows_at_once] = part.div(step[..., None]).round_().clamp_(
                -127, 127).flatten(1).to(torch.int8)
        self.register_buffer("weight_int8", q)  # [rows, D]
        self.register_buffer("scale", scale.to(w.dtype))  # [rows, D / group], the model's dtype

    def forward(self, x):
        rows = F.embedding(x, self.weight_int8).to(self.scale.dtype)  # [..., D]
        return (rows.unflatten(-1, (self.scale.shape[1], -1))
                * F.embedding(x, self.scale)[..., None]).flatten(-2)

    def dequantized(self) -> torch.Tensor:
        """The table this layer looks rows up in, in float32 [rows, D]."""
        q = self.weight_int8.float().unflatten(1, (self.scale.shape[1], -1))
        return (q * self.scale.float()[..., None]).flatten(1)


class Bf16Embedding(nn.Embedding):
    """An embedding table stored in bf16 (half of fp32's memory), its rows handed out in the
    model's dtype (bf16's rounding, 2^-9 of a value, is the reference model's own)."""

    def __init__(self, table: nn.Embedding):
        super().__init__(*table.weight.shape, _weight=table.weight.detach().bfloat16(),
                         _freeze=True)
        self.out_dtype = table.weight.dtype

    def forward(self, x):
        return super().forward(x).to(self.out_dtype)


INT8_TABLES = ("text_embeddings",)  # the others in bf16 (see above)


def compact_embeddings(model: nn.Module, only: str | None = None) -> int:
    """A quantized model's embedding tables made compact (only: the one of that name): int8
    for INT8_TABLES, bf16 for other fp32 ones; how many."""
    n = 0
    for name, m in list(model.named_modules()):
        if type(m) is not nn.Embedding or only not in (None, name):
            continue
        if name in INT8_TABLES:
            compact = Int8Embedding(m)
        elif m.weight.dtype == torch.float32:
            compact = Bf16Embedding(m)
        else:
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, compact)
        n += 1
    return n
