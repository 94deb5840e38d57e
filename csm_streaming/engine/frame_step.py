"""One frame for every slot at once: the step the engine compiles and captures in a CUDA graph.

It reads and writes only fixed tensors (the slots' SlotState and the KV caches), takes no
tensor arguments and makes no host sync, so one captured graph per batch bucket replays it.
The scheduler (scheduler.py) decides which rows run and when the host looks at the results.
"""

from __future__ import annotations

import torch

from csm_streaming.engine.graphs import EAGER
from csm_streaming.engine.slots import SlotState
from csm_streaming.model.llama import attended_keys
from csm_streaming.model.sampling import is_eos


class FrameStep:
    """The batched frame step over one engine's slots: the model, their fixed tensors, the KV
    caches and the compiled parts (graphs.FrameParts; None: eager)."""

    def __init__(self, model, state: SlotState, caches, parts=None):
        self.model, self.state, self.caches = model, state, caches
        self.parts = parts or EAGER
        self.window = caches.max_seq

    def __call__(self, n: int, candidates: int | None = None,
                 seen: int | None = None) -> torch.Tensor:
        """Advance the first n slots by one frame -> their codes [n, 32], drawing each code
        among `candidates` logits (>= every running stream's top-k; None: all). seen: the
        cache positions the backbone's attention reads (None: the whole window)."""
        m, st, p = self.model, self.state, self.parts
        last_h, pos, ended, valid = st.last_h[:n], st.pos[:n], st.ended[:n], st.valid[:n]
        sampling = st.sampling.rows(n, candidates)
        codes = m.sample_frame(last_h, sampling, self.caches, depth=p.depth, sample=p.sample)
        sampling.frame.add_(1)
        ended.logical_or_(is_eos(codes))
        valid.add_((~ended).long())
        # compiled, the cut is a length the graph takes as dynamic
        cut = ({"keys": attended_keys(self.window, seen, pos.device)}
               if seen is not None and p.backbone is not None else {"seen": seen})
        last_h.copy_(m.backbone_step(codes, pos, self.caches, backbone=p.backbone, **cut))
        pos.add_(1).clamp_(max=self.window - 1)
        return codes
