"""Capturing a step in a CUDA graph (moshi's pattern: the same Python runs eagerly where graphs
are off or there is no CUDA), and copies of a module that share its weights but not its state."""

from __future__ import annotations

import copy
import itertools
import time

import torch


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

