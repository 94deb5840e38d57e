"""Linear layers made for speed on a CPU, swapped into a built model in place.

A frame step is ~2,000 skinny matrix products (one row per stream against a big weight): their
speed is the step's speed. Which library does them best depends on the CPU: on an AMD EPYC
(Zen 3, AVX2) oneDNN's prepacked kernels read the weights 1.2-2x faster than MKL's at one row
and 2-4x faster at 2-8 rows; Intel's own MKL may win on Intel. So nothing is assumed: the
engine measures the candidates on the model's largest weights at its own batch size
(`speed_up_cpu_linears`) and swaps in the fastest:

- `DnnLinear`: the weight reordered once by oneDNN for the batch (held instead of the plain
  weight: no extra memory);
- `PackedLinear`: the weight also prepacked by MKL for the batch (calls with another row count
  use the plain weight, in the same MKL op);
- plain nn.Linear when neither is faster.

`restore_linears` undoes the swap (torch.compile traces plain layers).
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path

import torch
import torch.nn as nn

log = logging.getLogger("csm.cpu")
MIN_GAIN = 0.05  # a kernel must be this much faster than the plain one to be swapped in


class PackedLinear(nn.Module):
    """nn.Linear with its weight also prepacked by MKL for `batch` rows (CPU, fp32)."""

    def __init__(self, weight: nn.Parameter, batch: int):
        super().__init__()
        self.weight = weight  # same parameter, same state-dict key
        self.batch = batch
        self.register_buffer("packed", torch.ops.mkl._mkl_reorder_linear_weight(weight, batch),
                             persistent=False)

    def forward(self, x):
        return torch.ops.mkl._mkl_linear(x, self.packed, self.weight, None, self.batch)

    def plain_weight(self) -> torch.Tensor:
        return self.weight


class DnnLinear(nn.Module):
    """A Linear whose weight is held reordered by oneDNN for `batch` rows (CPU, fp32)."""

    def __init__(self, weight: torch.Tensor, batch: int):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.batch = batch
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), batch)
        self.register_buffer("packed", packed, persistent=False)

    def forward(self, x):
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, self.in_features), self.packed, None,
                                               "none", [], "")
        return y.view(*x.shape[:-1], self.out_features)

    def plain_weight(self) -> torch.Tensor:
        return nn.Parameter(self.packed.to_dense(), requires_grad=False)  # exact


KERNELS = {"onednn": DnnLinear, "mkl": PackedLinear}


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


def _plain(layer) -> nn.Linear:
    weight = layer.plain_weight()
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    lin.weight = weight
    return lin


def restore_linears(model: nn.Module) -> int:
    """Plain nn.Linear layers again (what torch.compile traces, what state_dict shows)."""
    return swap_layers(model, lambda m: _plain(m) if isinstance(m, tuple(KERNELS.values())) else m)


def cpu_kernel_applies(model: nn.Module) -> bool:
    p = next(model.parameters())
    return p.device.type == "cpu" and p.dtype == torch.float32


def measure_kernels(weights: list[torch.Tensor], batch: int, repeats: int = 5
                    ) -> dict[str, float]:
    """Seconds of each kernel (plain, and each one this CPU can run) over `weights`, at one row
    and at `batch` rows (the engine runs both: one stream, a full bucket). The kernels take
    turns in every repeat, so a noisy moment of the machine does not fall on one of them."""
    rows = sorted({1, batch})
    cases = [(w, torch.randn(m, w.shape[1])) for w in weights for m in rows]
    runs = {"plain": [lambda x, w=w: torch.nn.functional.linear(x, w) for w in weights]}
    for name, cls in KERNELS.items():
        try:
            runs[name] = [cls(w, batch) for w in weights]
            runs[name][0](cases[0][1])
        except (RuntimeError, AttributeError) as e:  # not in this build, or not on this CPU
            runs.pop(name)
            log.debug("%s kernels unavailable: %s", name, e)
    def over_cases(fns):
        def run():
            for i, (_, x) in enumerate(cases):
                fns[i // len(rows)](x)
        return run

    best = time_in_turns({name: over_cases(fns) for name, fns in runs.items()}, repeats)
    return {name: t / len(cases) for name, t in best.items()}


# The instruction sets that decide which kernel wins (int8, bf16) and that a CPU figure needs
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8",
             "amx_bf16", "asimd", "sve")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """Those of CPU_FLAGS this CPU has, as Linux lists them (empty elsewhere)."""
    try:
        words = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return frozenset()
    return frozenset(f for f in CPU_FLAGS if f in words)


def time_in_turns(candidates: dict, repeats: int = 5) -> dict[str, float]:
    """The best seconds of each `candidates[name]()` over `repeats` rounds (a first round
    warms up). The candidates take turns in every round, so a noisy moment of the machine does
    not fall on one of them. Every "the fastest here" choice of the project measures with it."""
    best = dict.fromkeys(candidates, float("inf"))
    with torch.inference_mode():
        for _ in range(repeats + 1):
            for name, fn in candidates.items():
                t = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - t)
    return best


def sample_weights(linears: list[nn.Linear], count: int = 4) -> list[torch.Tensor]:
    """One weight of each of the `count` largest shapes (CSM-1B: the backbone's and the
    decoder's MLP, both ways round): what a frame step spends its time on."""
    by_shape = {}
    for m in sorted(linears, key=lambda m: -m.weight.numel()):
        by_shape.setdefault(tuple(m.weight.shape), m.weight)
    return list(by_shape.values())[:count]


@torch.no_grad()
def speed_up_cpu_linears(model: nn.Module, batch: int) -> str:
    """Swap every Linear for the fastest kernel measured on this CPU (fp32 on a CPU only);
    returns its name ("plain" when nothing beat nn.Linear by MIN_GAIN)."""
    if not cpu_kernel_applies(model):
        return "plain"
    restore_linears(model)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        return "plain"
    times = measure_kernels(sample_weights(linears), batch)
    name = min(times, key=times.get)
    if name == "plain" or times[name] > (1 - MIN_GAIN) * times["plain"]:
        name = "plain"
    else:
        cls = KERNELS[name]
        swap_layers(model, lambda m: cls(m.weight, batch) if isinstance(m, nn.Linear) else m)
    log.info("CPU matrix kernel: %s (%s)", name,
             ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in times.items()))
    return name
