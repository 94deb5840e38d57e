"""The engine's streaming Mimi: moshi's own CUDA graphs off, and its state narrowed to the
rows that emit audio, so a chunk decodes as many rows as the streams that speak need, not one
per slot."""

from __future__ import annotations

import copy
from contextlib import contextmanager

import torch

MIMI_GRAPHS = ("graphed_tr_enc", "graphed_tr_dec", "graphed_encoder", "graphed_decoder")


def mimi_graphs_off(mimi) -> None:
    """Turn off moshi's own CUDA graphs in a streaming Mimi's state (call after entering
    streaming). moshi captures each part at its first call's shape and raises a ValueError at
    any other, but the engine decodes chunks of varying length (a first chunk, a chunk cut
    short for a newcomer, a stream's last frames) and encodes context audio whose last slice is
    shorter. Mimi then runs eagerly; the engine's own graph is the frame step's."""
    state = mimi._streaming_state
    for name in MIMI_GRAPHS:
        graphed = getattr(state, name, None)
        if graphed is not None:
            graphed.disable = True


def decode_chunk(mimi, codes: torch.Tensor, kept: dict[int, int], slots: int,
                 frame_batch: int | None) -> tuple[list[torch.Tensor], int]:
    """A chunk's codes [slots, frames, 32] -> (per-slot CPU audio, rows decoded), in the
    streaming state of `mimi` (one row per slot). kept: frames each running slot keeps.

    Only the rows up to the last slot that keeps frames are decoded (`first_rows`): one stream
    in a wide engine costs one row, not one per slot. Frames every stream keeps are decoded in
    calls of `frame_batch` frames (None: all in one); frames past a stream's end only for the
    streams that keep them (exec mask), so no stream's codec state sees frames it will not play.
    """
    speaking = [slot for slot, k in kept.items() if k > 0]
    if not speaking:
        return [torch.zeros(0)] * slots, 0
    rows, common, device = max(speaking) + 1, min(kept.values()), codes.device

    def rows_mask(frame: int) -> torch.Tensor:
        mask = torch.zeros(slots, dtype=torch.bool)
        for slot, k in kept.items():
            mask[slot] = k > frame
        return mask.to(device)

    def decode(frames: slice, mask_frame: int) -> torch.Tensor:  # [rows, 1, samples]
        mimi.set_exec_mask(rows_mask(mask_frame))  # set on the full state
        with first_rows(mimi, rows):
            return mimi.decode(codes[:rows, frames].transpose(1, 2))

    fb = frame_batch or max(common, 1)
    pieces = [decode(slice(start, min(start + fb, common)), 0) for start in range(0, common, fb)]
    pieces += [decode(slice(f, f + 1), f) for f in range(common, max(kept.values()))]
    mimi.set_exec_mask(torch.ones(slots, dtype=torch.bool, device=device))
    audio = list(torch.cat(pieces, dim=-1)[:, 0].float().cpu())  # [rows, samples]
    return audio + [torch.zeros(0)] * (slots - rows), rows


@contextmanager
def first_rows(mimi, n: int):
    """Inside, Mimi's streaming state is its first n rows (calls take [n, ...] inputs).

    Every streaming part's state is swapped for a shallow copy whose per-row tensors are views
    of the first n rows: what moshi writes in place (most of it) lands in the full state, and a
    field it replaces (a conv's `first` flags) is copied back on the way out, with its counters.
    Rows n.. are left as they were, as an exec mask would leave them, at none of the cost.
    """
    swaps = []
    for module in mimi.modules():
        state = getattr(module, "_streaming_state", None)
        if state is not None and n < state.batch_size:
            view = _narrowed(state, n)
            module._streaming_state = view
            swaps.append((module, state, view))
    try:
        yield
    finally:
        for module, state, view in swaps:
            _write_back(state, view, n)
            module._streaming_state = state


def _is_ring_cache(value) -> bool:
    return hasattr(value, "cache") and hasattr(value, "end_offset")  # moshi's RingKVCache


def _narrowed(state, n: int):
    view = copy.copy(state)
    rows = state.batch_size
    for name, value in vars(state).items():
        if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == rows:
            setattr(view, name, value[:n])
        elif _is_ring_cache(value):  # cache [2 (k, v), B, heads, T, dim], end_offset [B]
            ring = copy.copy(value)
            ring.cache = value.cache[:, :n]
            if value.end_offset.shape[0] == rows:
                ring.end_offset = value.end_offset[:n]
            setattr(view, name, ring)
    view.batch_size = n
    return view


def _write_back(state, view, n: int):
    for name, value in vars(state).items():
        new = getattr(view, name)
        if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == state.batch_size:
            if new.data_ptr() != value.data_ptr():  # replaced, not written in place
                value[:n].copy_(new)
        elif _is_ring_cache(value):
            for field in ("cache", "end_offset"):
                full, part = getattr(value, field), getattr(new, field)
                if part.data_ptr() != full.data_ptr():
                    (full[:, :n] if field == "cache" else full[:n]).copy_(part)
            for field, v in vars(new).items():  # counters (ints)
                if not isinstance(v, torch.Tensor):
                    setattr(value, field, v)
        elif not isinstance(value, torch.Tensor) and name != "batch_size" and new is not value:
            setattr(state, name, new)  # counters (offset_cpu ints)
