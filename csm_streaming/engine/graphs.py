"""Capturing a step in a CUDA graph (moshi's pattern: the same Python runs eagerly where graphs
are off or there is no CUDA), compiling a module (with a CPU's own settings), and copies of a
module that share its weights but not its state."""

from __future__ import annotations

import copy
import itertools
import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from csm_streaming.model.cpu_kernels import restore_linears
from csm_streaming.model.quantize import Int4Linear, Int8Linear
from csm_streaming.model.sampling import sample_topk

log = logging.getLogger("csm.engine")

# Compiling on a CPU: inductor's own C++ matrix kernels, chosen by timing them against ATen's
# (max-autotune), over weights frozen into the graph and packed for them. At one row they read
# the weights 1.1-1.5x faster than oneDNN's prepacked kernel (benchmarks/bench_frame.py
# --compile). Costs: a minute or two of compiling per batch bucket on 2 cores, and the packed
# copies of the backbone's and depth decoder's weights beside the plain ones (the prefill and
# the reference loop still use those).
CPU_COMPILE_OPTIONS = {"max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN",
                       "freezing": True,
                       # the tuning's tables to stderr, a dozen lines a shape: not for users
                       "autotune_num_choices_displayed": 0,
                       "max_autotune_report_choices_stats": False}


def cpu_compile_options(model: torch.nn.Module) -> dict:
    """CPU_COMPILE_OPTIONS, without freezing where every Linear is int8 over FBGEMM's kernel:
    freezing then has no float product to pack for inductor's kernels (FBGEMM's packed weights
    stay outside the graphs, found by layer number), and it costs every start: it keeps
    AOTAutograd's cache off, so each start traced and froze the graphs again. random:csm-1b
    int8 on the AVX-512 EPYC, a start over a warm inductor cache: warm-up 8 s against 24, the
    frame step as fast within this machine's spread (one stream 217-240 ms best against
    244-272, step_fn(1), two starts each in turns; bench_streaming --steps-only, one run after
    the other: one stream 215 against 270 ms, 8 streams 479 against 453). oneDNN's int8
    product needs its packed weights frozen in as constants (inductor's lowering asserts it);
    called through an operator of ours instead (as FBGEMM's, nothing frozen) its step was
    1.7x slower: 320 against 186 ms at one stream, 455 against 409 at 8, in turns in one
    process (the compiled lowering keeps oneDNN's primitive and fuses around it; each eager
    call pays for its own setup, 623 calls a frame). fp32 / bf16 products are tuned over
    frozen weights: those keep freezing, as int4 layers do (not measured without)."""
    linears = [m for m in model.modules()
               if isinstance(m, (torch.nn.Linear, Int8Linear, Int4Linear))]
    if linears and all(isinstance(m, Int8Linear) and m.cpu_kernel == "fbgemm"
                       for m in linears):
        return {**CPU_COMPILE_OPTIONS, "freezing": False}
    return CPU_COMPILE_OPTIONS


class CUDAGraphed:
    """Run `fn()` eagerly for a few warm-up calls, then capture it once and replay the graph.

    `fn` takes no arguments: it reads and writes static buffers. Its outputs are views of the
    graph's static memory: the caller copies them before the next call. disable=True (CPU, MPS,
    NO_CUDA_GRAPH) runs the very same Python eagerly every time.
    """

    def __init__(self, fn, disable: bool, warmup_steps: int = 2):
        self.fn, self.disable, self.warmup_steps = fn, disable, warmup_steps
        self.graph = None
        self.output = None
        self.calls = 0
        self.capture_s = 0.0

    def __call__(self):
        if self.disable:
            return self.fn()
        if self.graph is None:
            self.calls += 1
            if self.calls <= self.warmup_steps:
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    out = self.fn()
                torch.cuda.current_stream().wait_stream(stream)
                return out
            t = time.perf_counter()
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.output = self.fn()  # recorded, not run
            self.capture_s = time.perf_counter() - t
        self.graph.replay()
        return self.output


def shared_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A copy with its own streaming state that shares the weights (Mimi's encoder and decoder
    states live in module attributes, the weights in parameters and buffers)."""
    memo = {id(t): t for t in itertools.chain(module.parameters(), module.buffers())}
    return copy.deepcopy(module, memo)


def compiles_well(model: torch.nn.Module, device: torch.device) -> bool:
    """False for int8 weights on a CPU multiplied by torch's weight-only kernel (no int8 x int8
    product there). oneDNN's int8 product (`Int8Linear.onednn_mm`) is an operator inductor's
    graphs call over packed weights frozen in them; FBGEMM's (`Int8Linear.fbgemm_mm`) goes in
    as an operator of ours that finds its packed weights by the layer's number: with either,
    the whole backbone and depth decoder compile, the activations' split fused with the small
    ops around it."""
    if device.type != "cpu":
        return True
    kernels = {m.cpu_kernel for m in model.modules() if isinstance(m, Int8Linear)}
    return kernels <= {"onednn", "fbgemm"}


def own_code(fn):
    """A function with a code object of its own that calls `fn`. Dynamo keeps compiled graphs
    per code object; with the modules' guards left out (compile_module) another model's call of
    the same code (Transformer.forward) would get this one's graphs, its frozen weights in them
    (two models compiled in one process: a benchmark's variants, the tests)."""
    scope = {"fn": fn}
    exec("def call(*args, **kwargs):\n    return fn(*args, **kwargs)\n", scope)  # a new code
    return scope["call"]


def compile_module(fn, device: torch.device, options: dict = CPU_COMPILE_OPTIONS):
    """torch.compile of a module or function, for fixed shapes. On a CPU each call runs with
    `options` set (CPU_COMPILE_OPTIONS, or cpu_compile_options' for the model), since inductor
    reads them when a call compiles a new graph (given as torch.compile's `options`, freezing
    was not applied and no kernel was tuned). Dynamo's guards on the modules' parameters are
    left out (they cost ~0.2-0.4 ms a call at full size, 32 calls a frame): frozen weights are
    constants no guard could check, and the engine never swaps a compiled module's weights."""
    if device.type != "cpu":
        return torch.compile(fn, dynamic=False)
    # inductor's own deprecated calls (oneDNN int8 lowering, kernel tuning): nothing to act on
    warnings.filterwarnings("ignore", category=UserWarning,
                            module=r"torch\._inductor\.(mkldnn_lowerings|select_algorithm)")
    compiled = torch.compile(own_code(fn), dynamic=False, options={
        "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe})
    import torch._inductor.config as inductor_config

    def run(*args, **kwargs):
        with inductor_config.patch(options):
            return compiled(*args, **kwargs)
    return run


@dataclass(frozen=True)
class FrameParts:
    """The compiled parts of a frame step: CSM.backbone_step's `backbone`, and sample_frame's
    `depth` (CSM.depth_step: the projection and the depth decoder, one graph) and `sample`
    (sample_topk: one graph instead of ~50 small ops, 32 calls a frame)."""

    backbone: Callable
    depth: Callable
    sample: Callable


EAGER = FrameParts(None, None, None)  # every part eager (None: the model's own)


def compile_frame_parts(model: torch.nn.Module, device: torch.device,
                        buckets: int) -> FrameParts | None:
    """The frame step's parts compiled, or None where that does not pay (int8 weights on a CPU
    without an int8 x int8 product, said in a warning).

    Compiled per part, not the whole step: a frame is the backbone step and 31 calls of one
    small depth graph, where the whole step traced as one graph unrolls the loop (~8400 nodes
    for random:tiny; inductor did not finish it in 13 minutes on 2 cores). The CUDA graph of
    the step (step_fn) still holds the whole loop. The 31 audio heads stay eager: one graph
    each would take 31 compilations. Per batch bucket: one backbone graph and two depth graphs
    (2 positions, then 1), the backbone's and the depth decoder's of one function
    (Transformer.forward), and one sampler graph per candidate count (up to 3): dynamo caps a
    function's graphs at 8 by default, past which larger buckets would silently run eagerly.
    """
    if not compiles_well(model, device):
        kernel = next(m.cpu_kernel for m in model.modules() if isinstance(m, Int8Linear))
        log.warning("--compile is not used for int8 weights on this CPU: its int8 kernel (%s) "
                    "is torch's weight-only one (no oneDNN or FBGEMM int8 x int8 product "
                    "here: compiling is kept for those); running eager int8", kernel)
        return None
    restore_linears(model)  # inductor traces plain layers
    for m in model.modules():  # int8: packed (oneDNN's: the graphs' constants) and numbered
        if isinstance(m, Int8Linear):  # before tracing, in the model's order
            m.prepare_for_graphs()
    import torch._dynamo

    limit = torch._dynamo.config
    limit.recompile_limit = max(limit.recompile_limit, 3 * buckets)
    options = cpu_compile_options(model)
    return FrameParts(compile_module(model.backbone, device, options),
                      compile_module(model.depth_step, device, options),
                      compile_module(sample_topk, device, options))
