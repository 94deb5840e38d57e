"""A quantized model built without its full-precision twin: each layer quantized as its weights
are written (`build_quantized`, what checkpoints.build_model does with `quantize`)."""

from __future__ import annotations

import functools
import logging
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn as nn

from csm_streaming.model.embedding_tables import Int8Embedding, compact_embeddings
from csm_streaming.model.quantize import (
    Int8Linear,
    check_mode,
    int8_kernel_for,
    quantize_audio_heads,
    quantize_layer,
)
from csm_streaming.model.weight_cache import WeightCache

log = logging.getLogger("csm.quantize")


@torch.no_grad()
def build_quantized(model: nn.Module, fill, mode: str, cache=None) -> int:
    """Write a model's weights and quantize them in one pass: `fill(name, tensor)` writes one
    parameter in place (random, or a checkpoint's), and each Linear is quantized as soon as its
    weight is written, its full-precision weight then freed. The tensors were allocated but
    not written (`to_empty`: on a CPU no page is in memory before it is written), so the
    full-precision model never exists at once: the peak is the quantized model and a layer
    per worker (build_workers), where quantize_model's is the whole model beside it. Same
    layers, kernels and (random) values as building the model and calling quantize_model; int8
    layers then keep only their kernel's packed copy (drop_unpacked). Returns how many layers.

    cache (model/weight_cache.py): a CacheWriter is handed what each parameter became (a
    layer's int8 rows and scales, a table, a norm's scale) before packing; a WeightCache holding
    them builds the model from them instead (no fill, no quantizing: the layers' shapes are
    made on the meta device). Both read tensors mapped from their files: the int8 text table
    stays mapped, not copied (a prompt looks up a row a token, so only the rows looked up
    come into memory: ~0.3 GB of CSM-1B's stay out)."""
    device = next(model.parameters()).device
    check_mode(mode, device)
    kernel = int8_kernel_for(model)  # before any weight is written: it times random ones
    kinds = _kinds(model)
    reading = isinstance(cache, WeightCache)

    @torch.no_grad()  # grad mode is a thread's own: the workers' too
    def build(name: str) -> tuple[int, int]:
        """One parameter written and, where it is a layer's weight, quantized and packed ->
        (layers made, int8 layers that kept only their packed copy)."""
        p, kind = model.get_parameter(name), kinds.get(name)
        if kind is None:  # a norm's scale: nothing to quantize, nothing freed
            if reading:
                p.copy_(cache.read(name)["value"])
            else:
                fill(name, p)
                if cache is not None:
                    cache.save(name, {"value": p})
            return 0, 0
        if reading:  # only the shapes: the values are read below
            _on_meta(model, name)
        else:
            fill(name, p)
        made, unit = _quantize(model, name, kind, mode)
        _read_or_keep(unit, name, cache, device)
        return len(made), _pack(made, kernel)

    # The embedding tables first (their fp32 values and int8 copy meet before the rest exists),
    # then the layers, `build_workers` at a time: drawing random values, reading and FBGEMM's
    # packing run on one core each and let go of the GIL (the quantizing's own ops take every
    # thread)
    names = list(kinds)
    with ThreadPoolExecutor(build_workers(), thread_name_prefix="quantize") as pool:
        try:
            done = [*pool.map(build, [n for n in names if kinds[n] == "table"]),
                    *pool.map(build, [n for n in names if kinds[n] != "table"])]
        except BaseException:  # the rest is not started: the load failed
            pool.shutdown(cancel_futures=True)
            raise
    if reading:
        _off_meta(model, device)
    n, dropped = map(sum, zip(*done))
    log.info("%s weights: %d layers %s (%d int8 layers keep only their %s-packed copy)", mode,
             n, "read from the cache" if reading else "quantized as they were written",
             dropped, kernel)
    return n


def _kinds(model: nn.Module) -> dict[str, str | None]:
    """Each parameter's name -> what it becomes: a Linear's weight its layer's name, "table",
    "audio heads", or None (a norm's scale: kept as it is)."""
    linears = {f"{name}.weight": name for name, m in model.named_modules()
               if isinstance(m, nn.Linear)}
    tables = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, nn.Embedding)}
    kinds = {}
    for name, p in model.named_parameters():  # names only: no tensor is held
        if name == "audio_head" and p.numel():
            kinds[name] = "audio heads"
        else:
            kinds[name] = "table" if name in tables else linears.get(name)
    return kinds


def _quantize(model: nn.Module, name: str, kind: str, mode: str) -> tuple[list, nn.Module]:
    """The parameter `name` made into its quantized module -> (the int8 / int4 layers made,
    the module whose state is what the parameter became)."""
    if kind == "table":
        compact_embeddings(model, only=name.removesuffix(".weight"))
        return [], model.get_submodule(name.removesuffix(".weight"))
    if kind == "audio heads":
        quantize_audio_heads(model)
        return list(model.audio_heads_int8), model.audio_heads_int8
    layer = quantize_layer(model, kind, mode)
    return [layer], layer


def _read_or_keep(unit: nn.Module, name: str, cache, device: torch.device):
    """The state of what the parameter `name` became read from a WeightCache, or kept in a
    CacheWriter; an int8 text table on a CPU then mapped from its file (build_quantized)."""
    mapped = isinstance(unit, Int8Embedding) and device.type == "cpu"
    if isinstance(cache, WeightCache):
        if mapped:
            unit.load_state_dict(cache.read(name), assign=True)
        else:
            unit.to_empty(device=device).load_state_dict(cache.read(name))
    elif cache is not None and cache.save(name, unit.state_dict()) and mapped:
        unit.load_state_dict(cache.read(name), assign=True)


def _pack(made: list, kernel: str) -> int:
    """Each int8 layer packed for `kernel`, keeping only its packed copy -> how many did."""
    dropped = 0
    for m in made:
        if isinstance(m, Int8Linear):
            m.use_cpu_kernel(kernel)
            dropped += m.drop_unpacked()
    _give_back_freed_memory()
    return dropped


def _on_meta(model: nn.Module, name: str):
    """The parameter `name` replaced by one of its shape on the meta device (its memory, never
    written, goes): quantizing it then makes the layer's shapes without computing a value."""
    parent, _, child = name.rpartition(".")
    module, p = model.get_submodule(parent), model.get_parameter(name)
    setattr(module, child, nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False))


def _off_meta(model: nn.Module, device: torch.device):
    """What quantizing on the meta device left there: the empty tensors the quantized layers
    replaced (the audio heads' [31, D, V] becomes [0]), made again on `device`."""
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.device.type != "meta":
            continue
        if t.numel():
            raise RuntimeError(f"{name} was not read from the cache: a bug, please report it")
        parent, _, child = name.rpartition(".")
        empty = torch.empty_like(t, device=device)
        setattr(model.get_submodule(parent), child,
                nn.Parameter(empty, requires_grad=False) if isinstance(t, nn.Parameter) else empty)


def build_workers() -> int:
    """Layers built at once: one per thread torch may use, at most 4 (each holds one layer's
    full-precision weight until it is quantized: ~0.13 GB for CSM-1B's largest)."""
    return max(1, min(4, torch.get_num_threads()))


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None (another C library)."""
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def _give_back_freed_memory():
    """Return the heap's freed pages to the system: a layer's full-precision weight and the
    temporaries of its quantization are freed into malloc's arenas, which keep them (its
    threads' arenas more so) unless trimmed; without it the peak varied 3.1-3.9 GB."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
