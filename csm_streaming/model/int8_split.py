"""Float activations into int8 x int8 products, exact to ~16 bits: each stream's rows go in as two
8-bit parts (the rounded rows and their rounding error magnified) on one integer grid whose two
ends ride along, so that FBGEMM's and oneDNN's kernels (which round their input to 8 bits, or 7
without VNNI) scale by exactly 1 and round nothing. quantize.Int8Linear's products use it."""

from __future__ import annotations

import torch

# FBGEMM's packed weights have this many zero columns more, under the activation grid's ends:
# the ends go in every row at no cost (an extra row of them cost FBGEMM's AVX2 kernel ~1.3x the
# time of a one-stream product: its time grows with the rows).
ENDS_COLUMNS = 2


def grid_ends(narrow: bool) -> tuple[torch.Tensor, int]:
    """The two ends of the activation grid [1, ENDS_COLUMNS], and its top: 8 bits, or 7 on
    CPUs without VNNI (the int16 sums of AVX2's kernels must not saturate)."""
    return _GRID_ENDS[narrow]


_GRID_ENDS = {narrow: (torch.tensor([[-levels // 2, levels // 2 - 1]], dtype=torch.float32),
                       levels // 2 - 1) for narrow, levels in ((True, 128), (False, 256))}


def activation_parts(streams: torch.Tensor, ends: torch.Tensor | None, high: int
                     ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Streams' rows [S, P, K] -> ([2SP, K (+ 2)], steps [S, 1, 1], G). Each stream is divided
    by its step, the power of two that brings its largest value within the grid's top (exact);
    then come, stream by stream, its rows rounded to integers and their rounding error
    magnified G times and rounded, each row ending in the grid's two ends (`grid_ends`) unless
    `ends` is None. Every value is an integer within the ends: FBGEMM's dynamic quantization,
    which picks its scale from the input's range, then scales by exactly 1 and rounds nothing.
    A stream's rows ~= (part 1 + part 2 / G) * its step, to ~1 / G^2 of its range."""
    gain = 2 * high  # the error is within half a step: times 2 * high, within the grid
    _, exponent = torch.frexp(streams.abs().amax(dim=(1, 2), keepdim=True) / high)
    steps = torch.exp2(exponent)  # >= a stream's largest |value| / high: a power of two
    scaled = streams / steps  # exact; |scaled| <= high
    q = scaled.round()
    err = scaled.sub_(q).mul_(gain).round_()
    parts = torch.cat([q, err], 1).flatten(0, 1)
    return (parts if ends is None else torch.cat([parts, ends.expand(len(parts), -1)], 1)), \
        steps, gain


def split_product(x: torch.Tensor, in_features: int, high: int, ends: torch.Tensor | None,
                  product) -> torch.Tensor:
    """An int8 x int8 kernel's product of float activations x [..., K], exact to ~16 bits: the
    kernels round activations to 8 bits (7 without VNNI), which alone costs ~1-2% of the
    output's size, so each stream's rows go in as two parts, the rounded rows and their
    rounding error magnified (`activation_parts`). Each stream (leading index) is scaled by its
    own power of two onto one integer grid, so all streams go in one call (one weight read),
    and a stream's numbers never depend on another's: batched equals solo, bit for bit.
    product: the integer rows [2SP, K (+ ends)] -> their sums [2SP, N'] in float32."""
    streams = (x.float().reshape(x.shape[0], -1, in_features) if x.dim() > 2
               else x.float()[:, None])
    s, p = streams.shape[:2]
    parts, steps, gain = activation_parts(streams, ends, high)
    y = product(parts).view(s, 2 * p, -1)
    y = y[:, :p].add_(y[:, p:], alpha=1 / gain).mul_(steps)  # [S, P, N']
    return y.to(x.dtype).view(*x.shape[:-1], -1)
