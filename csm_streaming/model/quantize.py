"""Weight-only quantization: int8 or int4 weights, the activations stay in their dtype.

A frame reads the backbone once and the depth decoder 31 times: ~9.1 GB in bf16, ~18.2 GB in
fp32. int8 weights read 5.1 GB (0.56x of bf16: the backbone's first 8 layers are kept in two
parts, see TWO_PART_INT8), int4 2.9 GB. The matrix products use torch's own kernels where they
exist:

- int8, per output channel, symmetric. On a CPU the fastest of three kernels, timed when the
  model is quantized (`choose_cpu_kernel`; CSM_INT8_KERNEL names one instead): FBGEMM's int8 x
  int8 product (`quantized.linear_dynamic`, kept unless another is clearly faster: see
  FBGEMM_MARGIN; in a compiled graph through our operator `fbgemm_int8_mm`; the kernel for
  AVX2-only CPUs: capped at AVX2, oneDNN's ran 8x slower), oneDNN's
  (`onednn::qlinear_pointwise`, which inductor's graphs call directly, its packed weights
  frozen in),
  both with each stream's activations in two 8-bit parts, ~16 bits together (`split_product`), or
  `aten._weight_int8pack_mm` (weight-only; no fast AVX2 path). `--compile` takes the whole
  int8 step with either int8 x int8 kernel. MPS: `_weight_int8pack_mm`. On
  CUDA, `linear(x, w.to(x.dtype)) * scale`, the form gpt-fast uses so that torch.compile (on
  by default there) fuses the cast into the matrix product (not run here: no GPU was lent).
  torch 2.13 deprecates the quantized tensor FBGEMM's packing takes; oneDNN's packing takes a
  plain int8 tensor.
- int4, groups of 32 (GGUF's Q4 block), asymmetric, a bf16 scale and zero per group (5 bits a
  weight in all): `aten._weight_int4pack_mm_for_cpu` (CPU; bf16 inside the layer, the model's
  dtype outside). Not offered on CUDA or MPS in this version. Its error is bounded from below:
  a Gaussian weight coded in R bits a weight cannot come closer than sigma * 2^-R (Shannon's
  rate-distortion bound); groups of 32 reach ~0.078 sigma against int8's ~0.008 (per output
  channel). On random weights, whose next-code distributions are nearly flat, top-1 agreement
  with bf16 needs int8's precision: int4 measures 0.25 there (groups of 128: 0.17), see
  docs/performance.md; on real weights it is for the acceptance to measure.

Every Linear of the backbone, the depth decoder, the projection and the codebook-0 head is
quantized, and the 31 audio heads (two int8 parts each: their rounding lands on the logits);
int4 mode (model/int4_layer.py) keeps int8 for the layers torch's int4 packing cannot take
(the codebook-0 head, 2051 outputs) and for the audio heads; the text embedding table is
int8 with a scale per 32 values, the audio table bf16 (model/embedding_tables.py). The activations'
split for the int8 x int8 products is model/int8_split.py. Quality on the real weights is not
measured here (no weights can be downloaded on this project's machines):
benchmarks/bench_quantize.py compares logits against bf16 on random weights.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import weakref
from fnmatch import fnmatch

import torch
import torch.nn as nn
import torch.nn.functional as F

from csm_streaming.model.embedding_tables import Int8Embedding, compact_embeddings
from csm_streaming.model.int4_layer import Int4Linear, int4_fits
from csm_streaming.model.int8_split import ENDS_COLUMNS, grid_ends, split_product

log = logging.getLogger("csm.quantize")
MODES = ("int8", "int4")


class Int8Linear(nn.Module):
    """A Linear with int8 weights, one scale per output channel (symmetric).

    parts=2: each weight row is stored as two int8 rows, the rounded row and its rounding error
    at 1/254 of the scale (~16 bits together, twice the bytes): for layers whose error every
    later step inherits (the backbone's first layers, TWO_PART_INT8). The kernels multiply by
    all parts' rows at once (2N outputs, one weight read) and add the halves.
    """

    def __init__(self, weight: torch.Tensor, parts: int = 1):
        super().__init__()
        if parts not in (1, 2):
            raise ValueError(f"parts must be 1 or 2 (got {parts!r})")
        w = weight.detach().float()
        rows, scales = [], []
        for part in range(parts):  # in place where it can: a load quantizes 1.5 billion weights
            peak = torch.maximum(w.amax(dim=1), w.amin(dim=1).neg_())  # = |w|'s max, no copy
            scale = peak.clamp_(min=1e-12).div_(127)  # [out]
            q = w.div(scale[:, None]).round_().clamp_(-127, 127)
            rows.append(q.to(torch.int8))
            scales.append(scale)
            if part + 1 < parts:
                w = w - q.mul_(scale[:, None])  # what the next part stores
        self.out_features, self.in_features = weight.shape
        self.parts = parts
        self.register_buffer("weight_int8", torch.cat(rows).to(weight.device))  # [parts*N, K]
        self.register_buffer("scale", torch.cat(scales).to(weight.device, weight.dtype))

    cpu_kernel = "int8pack"  # or "fbgemm", "onednn": chosen for the model by choose_cpu_kernel

    def __getstate__(self):
        # Copies and pickles pack again when first used: packed weights are opaque tensors
        # (oneDNN's cannot be copied).
        self._need_unpacked("copied")
        state = self.__dict__.copy()
        state.pop("_packs", None)
        state.pop("_number", None)  # the copy is another layer (FBGEMM_LAYERS)
        return state

    def prepare_for_graphs(self):
        """Packed for its kernel and, for FBGEMM's, given its number in FBGEMM_LAYERS (which
        compiled graphs call it by): before a graph is traced through it, in the model's own
        order, so the graphs are the same in every process (numbered as layers were packed, two
        threads at a time, they differed from start to start and inductor's caches never
        served the next one; numbered while tracing, each number broke the graph)."""
        self.use_cpu_kernel(self.cpu_kernel)
        if self.cpu_kernel == "fbgemm" and "_number" not in self.__dict__:
            self.__dict__["_number"] = number = next(_numbers)
            FBGEMM_LAYERS[number] = self

    @property
    def number(self) -> int:
        if "_number" not in self.__dict__:
            raise RuntimeError("an FBGEMM int8 layer is traced before it was numbered: call "
                               "prepare_for_graphs() first")
        return self.__dict__["_number"]

    def use_cpu_kernel(self, kernel: str):
        """Multiply with `kernel` from now on, its weights packed now (eagerly: a compiled graph
        must find them packed, not trace the packing)."""
        self.cpu_kernel = kernel
        if kernel in ("fbgemm", "onednn"):
            self.packed(kernel)

    packed_only = False  # the plain int8 rows were dropped: only the kernel's packed copy is kept

    def drop_unpacked(self) -> bool:
        """Keep only the packed copy of the weights its oneDNN / FBGEMM kernel multiplies by,
        not the plain int8 rows beside it (half the layer's memory). What needs the rows then
        (another kernel, a copy, `dequantized`) says so. False where the kernel packs none."""
        if self.cpu_kernel not in ("fbgemm", "onednn") or self.weight_int8.device.type != "cpu":
            return False
        self.packed(self.cpu_kernel)
        self.weight_int8 = self.weight_int8.new_empty(0, self.in_features)
        self.packed_only = True
        return True

    def _need_unpacked(self, what: str):
        if self.packed_only:
            raise RuntimeError(f"this int8 layer cannot be {what}: it keeps only the weights "
                               f"packed for {self.cpu_kernel} (a model loaded with --quantize "
                               "drops the plain rows to save memory); quantize a full-precision "
                               "model with quantize_model instead")

    def packed(self, kernel: str):
        """The weights packed for FBGEMM or oneDNN, made once (oneDNN's: with its scales)."""
        packs = self.__dict__.setdefault("_packs", {})
        if kernel not in packs and torch.compiler.is_compiling():
            raise RuntimeError(f"an int8 layer is compiled before its weights were packed for "
                               f"{kernel}: call use_cpu_kernel({kernel!r}) first")
        if kernel not in packs:
            self._need_unpacked(f"packed for {kernel}")
            w = self.weight_int8.cpu()
            if kernel == "fbgemm":  # with zero columns under the grid's ends (grid_ends)
                import warnings

                w = torch.cat([w, w.new_zeros(w.shape[0], ENDS_COLUMNS)], 1)
                with warnings.catch_warnings():  # torch 2.13 deprecates quantized tensors (its
                    warnings.simplefilter("ignore", UserWarning)  # packing still takes one)
                    qw = torch._make_per_channel_quantized_tensor(
                        w, self.scale.double().cpu(), torch.zeros(w.shape[0], dtype=torch.long), 0)
                packs[kernel] = torch.ops.quantized.linear_prepack(qw, None)
            else:  # with the scales and (zero) zero points its product takes
                packs[kernel] = (torch.ops.onednn.qlinear_prepack(w, None), self.scale.float(),
                                 torch.zeros(w.shape[0], dtype=torch.long))
        return packs[kernel]

    def forward(self, x):
        if x.device.type == "cpu" and self.cpu_kernel == "fbgemm":
            y = self.fbgemm_mm(x)
        elif x.device.type == "cpu" and self.cpu_kernel == "onednn":
            y = self.onednn_mm(x)
        else:
            self._need_unpacked(f"run on {x.device.type} with the {self.cpu_kernel} kernel")
            y = self.packed_mm(x) if x.device.type in ("cpu", "mps") else self.cast_mm(x)
        if self.parts == 1:
            return y
        return y.unflatten(-1, (self.parts, self.out_features)).sum(-2)

    def fbgemm_mm(self, x):
        """FBGEMM's int8 x int8 product (x86) with the same int8 weights -> [..., parts*N].
        FBGEMM quantizes its input itself, with the scale of the input's range: the grid's two
        ends go in as two more columns (`grid_ends`, times zero weights), so that scale is
        exactly 1 (`split_product`). Without VNNI the grid is 7 bits (FBGEMM's reduce_range: no
        int16 overflow)."""
        packed, narrow = self.packed("fbgemm"), not VNNI
        ends, high = grid_ends(narrow)
        if torch.compiler.is_compiling():  # the packed weights cannot be in a graph
            return split_product(x, self.in_features, high, ends, lambda parts: torch.ops
                                 .csm.fbgemm_int8_mm(parts, self.number, narrow))
        return split_product(x, self.in_features, high, ends, lambda parts: torch.ops
                             .quantized.linear_dynamic(parts, packed, narrow))

    def onednn_mm(self, x):
        """oneDNN's int8 x int8 product (`onednn::qlinear_pointwise`, the op inductor's own int8
        graphs call: it can be compiled) with the same int8 weights -> [..., parts*N]. It takes
        the activations already quantized, with a scale and zero point given: the integer parts
        of `split_product` go in as uint8 around a zero point, scale 1, and the int32 sums come
        out in float32 times the weight's scales. Without VNNI the parts stay within 7 bits
        (1..127 around 64): the pairwise int16 sums of AVX2's 8-bit products cannot saturate."""
        (packed, scale, zeros), high = self.packed("onednn"), 127 if VNNI else 63

        def product(parts):
            return torch.ops.onednn.qlinear_pointwise(
                parts.add_(high + 1).to(torch.uint8), 1.0, high + 1, packed, scale, zeros, None,
                1.0, 0, torch.float32, "none", [], "")
        return split_product(x, self.in_features, high, None, product)

    def packed_mm(self, x):
        """torch's int8 weight kernel (CPU, MPS) -> [..., parts*N]."""
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, self.in_features), self.weight_int8,
                                               self.scale.to(x.dtype))
        return y.view(*x.shape[:-1], -1)

    def cast_mm(self, x):
        """The weight cast in the product, the scale after (CUDA, where compile fuses it)."""
        return F.linear(x, self.weight_int8.to(x.dtype)) * self.scale.to(x.dtype)

    def dequantized(self) -> torch.Tensor:
        """The weight this layer multiplies by, in float32 [N, K]."""
        self._need_unpacked("dequantized")
        w = self.weight_int8.float() * self.scale.float()[:, None]
        return w.view(self.parts, self.out_features, self.in_features).sum(0)


# FBGEMM's layers by number, for the operator below: compiled graphs call it with a number
FBGEMM_LAYERS: weakref.WeakValueDictionary[int, Int8Linear] = weakref.WeakValueDictionary()
_numbers = itertools.count()


def fbgemm_int8_mm(parts: torch.Tensor, layer: int, narrow: bool) -> torch.Tensor:
    """FBGEMM's product of integer rows by the packed weights of FBGEMM_LAYERS[layer]: the
    operator csm::fbgemm_int8_mm, which a compiled graph can call (FBGEMM's packed weights are
    objects a graph cannot hold), the activations' split fused around it. Registered as a
    plain CPU kernel: ~3 us a call over FBGEMM's own, where torch.library.custom_op's wrapper
    added ~9 (623 calls a frame)."""
    return torch.ops.quantized.linear_dynamic(parts, FBGEMM_LAYERS[layer].packed("fbgemm"),
                                              narrow)


_LIBRARY = torch.library.Library("csm", "FRAGMENT")
_LIBRARY.define("fbgemm_int8_mm(Tensor parts, int layer, bool narrow) -> Tensor")
_LIBRARY.impl("fbgemm_int8_mm", fbgemm_int8_mm, "CPU")


@torch.library.register_fake("csm::fbgemm_int8_mm")
def _(parts, layer, narrow):
    m = FBGEMM_LAYERS[layer]
    return parts.new_empty(parts.shape[0], m.parts * m.out_features)


def check_mode(mode: str | None, device: str | torch.device | None = None):
    """A ValueError that says what can run, unless `mode` can run on `device` (None: any)."""
    if mode is None:
        return
    if mode not in MODES:
        raise ValueError(f"quantize must be one of {', '.join(MODES)} (got {mode!r})")
    if mode == "int4" and device not in (None, "auto") and torch.device(device).type != "cpu":
        raise ValueError("int4 weights run on the CPU only in this version: use --quantize int8 "
                         "on a GPU")


@torch.no_grad()
def quantize_model(model: nn.Module, mode: str) -> int:
    """Replace the model's Linear layers by int8 / int4 ones in place; returns how many. int4
    takes every layer its packing can; the others, and the audio heads, are int8."""
    from csm_streaming.model.cpu_kernels import restore_linears

    check_mode(mode, next(model.parameters()).device)
    restore_linears(model)
    kernel = int8_kernel_for(model)
    n = len([quantize_layer(model, name, mode) for name, m in list(model.named_modules())
             if isinstance(m, nn.Linear)])
    compact_embeddings(model)
    return n + _finish(model, kernel)


def int8_kernel_for(model: nn.Module) -> str:
    """The int8 kernel the model's int8 layers will use: on a CPU the one CSM_INT8_KERNEL
    names (fbgemm, onednn, int8pack), else the one timed fastest; elsewhere the default."""
    if next(model.parameters()).device.type != "cpu":
        return Int8Linear.cpu_kernel
    named = os.environ.get("CSM_INT8_KERNEL")
    if not named:
        return choose_cpu_kernel(model)
    here = sorted({*int8_cpu_kernels(), "int8pack"})
    if named not in here:
        raise ValueError(f"CSM_INT8_KERNEL={named}: this CPU's int8 kernels are "
                         f"{', '.join(here)} (unset: the fastest)")
    log.info("int8 CPU kernel: %s (CSM_INT8_KERNEL)", named)
    return named


def quantize_layer(model: nn.Module, name: str, mode: str) -> nn.Module:
    """The Linear called `name` replaced by its int4 (where int4's packing takes it) or int8
    layer (two parts for TWO_PART_INT8's); returns the new layer."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    m = getattr(parent, child)
    if mode == "int4" and int4_fits(m):
        new = Int4Linear(m.weight)
    else:
        two = any(fnmatch(name, p) for p in TWO_PART_INT8)
        new = Int8Linear(m.weight, parts=2 if two else 1)
    setattr(parent, child, new)
    return new


def _finish(model: nn.Module, kernel: str) -> int:
    """The audio heads in int8 if they are not yet, and every int8 layer's kernel (packed now)."""
    n = quantize_audio_heads(model)
    for m in model.modules():
        if isinstance(m, Int8Linear):
            m.use_cpu_kernel(kernel)
    return n


def quantize_audio_heads(model: nn.Module) -> int:
    """CSM's 31 audio heads ([31, Dd, V], one matrix each per depth step: 260 MB of an fp32
    frame's reads) as two-part int8 layers (their rounding lands on the logits directly);
    the fp32 tensor is dropped. Returns how many (0 for a model without them)."""
    heads = getattr(model, "audio_head", None)
    if not isinstance(heads, nn.Parameter) or heads.numel() == 0:
        return 0
    model.audio_heads_int8 = nn.ModuleList(Int8Linear(w.T, parts=2) for w in heads)
    model.audio_head = nn.Parameter(heads.new_empty(0), requires_grad=False)
    return len(model.audio_heads_int8)


# int8 in two parts (~16-bit weights) where the rounding of one part costs the most: the
# backbone's first layers, whose error every later layer, codebook and frame inherits. Random
# full-size weights, 50 frames, against bf16 (top-1, mean KL): every layer one part 0.878 /
# 1.10e-3; the first 1, 2, 4, 6, 8 layers in two parts 0.896, 0.902, 0.910, 0.908, 0.914 /
# 6.8, 6.0, 5.4, 5.1, 5.0e-4; the last 8 0.877 / 1.08e-3; all 16 0.912 / 4.7e-4; the
# attention and down products of all 16 (1.41 GB) 0.903 / 6.7e-4. The first 8 read 1.46 GB a
# frame where all 16 read 1.95 (a frame reads 5.1 GB instead of 5.6) at the same quality.
TWO_PART_INT8 = ("backbone.layers.[0-7].*",)


# Instruction-set caps of the int8 libraries below which they have no VNNI: they sum 8-bit
# pairs in saturating int16 (AVX2's vpmaddubsw) like a CPU without it
NO_VNNI_CAPS = {"ONEDNN_MAX_CPU_ISA": ("SSE41", "AVX", "AVX2", "AVX512_CORE"),
                "FBGEMM_ENABLE_INSTRUCTIONS": ("AVX2", "AVX512", "AVX512_256")}


def cpu_has_vnni() -> bool:
    """VNNI (AVX-512 or AVX) multiplies 8-bit pairs into 32 bits: the int8 kernels may then
    take all 8 bits of the activations (half the error); without it, 7 (no int16 overflow).
    oneDNN or FBGEMM capped below VNNI (ONEDNN_MAX_CPU_ISA=AVX2, FBGEMM_ENABLE_INSTRUCTIONS=AVX2,
    as to measure an AVX2 CPU here) count as without: their 8-bit sums saturate (5.6% error
    against 2e-4 at 7 bits, tests)."""
    from csm_streaming.model.cpu_kernels import cpu_flags

    if any(os.environ.get(k, "").upper() in caps for k, caps in NO_VNNI_CAPS.items()):
        return False
    return bool(cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})


def fbgemm_available() -> bool:
    """FBGEMM's int8 ops are there (x86 builds; a torch that drops them falls back)."""
    try:
        torch.ops.quantized.linear_dynamic  # noqa: B018
    except (AttributeError, RuntimeError):
        return False
    return "fbgemm" in torch.backends.quantized.supported_engines


@functools.cache
def onednn_int8_available() -> bool:
    """oneDNN's int8 product is there and runs (torch built with oneDNN: x86, most ARM). Tried
    once: the kernel choice, `--dtype auto` and the tests ask again."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        layer = Int8Linear(torch.ones(16, 32))
        return bool(torch.allclose(layer.onednn_mm(torch.ones(1, 32)), torch.full((1, 16), 32.)))
    except (AttributeError, RuntimeError):
        return False


# FBGEMM's product is kept unless another measures this much faster. Timed alone on one large
# layer at one row, the two int8 x int8 kernels time alike where both have VNNI (the pick
# flipped run to run), but a whole frame step says more: random:csm-1b on the AVX-512 EPYC,
# window 2048, one model per kernel, their steps in turns (bench_streaming --steps-only
# --int8-kernels fbgemm,onednn): eager (the CPU's default) FBGEMM's step 303 ms against
# oneDNN's 430 at one stream, 629 against 615 at 8 (oneDNN's each call sets its product up,
# 623 calls a frame, many of them small); compiled, oneDNN's 234 against 245 at one stream,
# 474 against 522 at 8 (frozen into the graphs), but its graphs cannot be read back from
# inductor's caches without freezing again: a cached compiled start 17 s with FBGEMM's, ~33 s
# with oneDNN's. CSM_INT8_KERNEL=onednn takes oneDNN's where the compiled step matters most.
FBGEMM_MARGIN = 0.10


def int8_cpu_kernels() -> list[str]:
    """The int8 x int8 kernels this CPU has (oneDNN's, FBGEMM's), else the weight-only one."""
    kernels = [k for k, there in (("onednn", onednn_int8_available()),
                                  ("fbgemm", fbgemm_available())) if there]
    return kernels or ["int8pack"]


def choose_cpu_kernel(model: nn.Module) -> str:
    """The fastest int8 kernel on this CPU, timed on the model's largest weight at batch 1:
    oneDNN's or FBGEMM's int8 x int8 product (x86; activations in two 8-bit parts, one call;
    4.7-12x fp32 on an AVX2 EPYC) or torch's weight-only `_weight_int8pack_mm` (no fast AVX2
    path: slower than fp32 there). All multiply by the same int8 weights. FBGEMM's is kept
    within FBGEMM_MARGIN of the fastest. Says what it picked, and warns when int8 loses to the
    model's own dtype here."""
    from csm_streaming.model.cpu_kernels import time_in_turns

    largest = max((m.weight for m in model.modules() if isinstance(m, nn.Linear)),
                  key=torch.numel)  # its shape: random values (it may not be written yet)
    w = torch.randn(largest.shape, dtype=largest.dtype) * 0.02
    x = torch.randn(1, w.shape[1], dtype=w.dtype)
    layer = Int8Linear(w)
    candidates = {"fp": lambda: F.linear(x, w), "int8pack": lambda: layer.packed_mm(x)}
    if fbgemm_available():
        candidates["fbgemm"] = lambda: layer.fbgemm_mm(x)
    if onednn_int8_available():
        candidates["onednn"] = lambda: layer.onednn_mm(x)
    times = {k: v * 1000 for k, v in time_in_turns(candidates, 3).items()}
    best = min((k for k in times if k != "fp"), key=times.get)
    if "fbgemm" in times and times["fbgemm"] <= (1 + FBGEMM_MARGIN) * times[best]:
        best = "fbgemm"
    said = ", ".join(f"{k} {v:.2f} ms" for k, v in times.items())
    log.info("int8 CPU kernel: %s (%s, on a %dx%d weight)", best, said, *w.shape)
    if times[best] > times["fp"]:
        log.warning("int8 weights are %.1fx slower than %s on this CPU: try --quantize int4, "
                    "or none", times[best] / times["fp"], str(w.dtype).removeprefix("torch."))
    return best


def weight_bytes(module: nn.Module) -> int:
    """Bytes of a module's weights as stored: parameters and quantized buffers."""
    total = sum(p.numel() * p.element_size() for p in module.parameters())
    for m in module.modules():
        if isinstance(m, Int8Linear):
            total += (m.parts * m.out_features * m.in_features  # one byte each, packed or not
                      + m.scale.numel() * m.scale.element_size())
        elif isinstance(m, Int4Linear):
            total += m.packed.numel() + m.scale_zero.numel() * 2
        elif isinstance(m, Int8Embedding):
            total += m.weight_int8.numel() + m.scale.numel() * m.scale.element_size()
    return total


VNNI = cpu_has_vnni()  # read once: the products consult it on every call
