"""Prompt pieces: rows of [positions, 33] tokens and their mask, for the reference loop and the
streaming engine alike: a text segment's rows, audio codes' rows, context audio encoded in
slices, and fitting the pieces into the window."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from csm_streaming.audio import FRAME_SAMPLES
from csm_streaming.engine.mimi_decode import mimi_graphs_off

ENCODE_SLICE_FRAMES = 4  # frames of context audio per Mimi encode call (one unit of prompt work)


def text_rows(tokenizer, text: str, speaker: int):
    """`[speaker]text` with BOS/EOS -> (tokens, mask) [n, 33]: only the text column is used."""
    ids = tokenizer.encode(f"[{speaker}]{text}").ids
    tokens = torch.zeros(len(ids), 33, dtype=torch.long)
    mask = torch.zeros(len(ids), 33, dtype=torch.bool)
    tokens[:, -1] = torch.tensor(ids)
    mask[:, -1] = True
    return tokens, mask


def audio_rows(codes: torch.Tensor):
    """Audio codes [n, 32] -> prompt rows ([n + 1, 33], mask): the codes, then the all-zero end
    frame; the text column unused. Encoded context and already-spoken segments both use it."""
    codes = torch.cat([codes.cpu(), torch.zeros(1, codes.shape[1], dtype=codes.dtype)])
    tokens = torch.zeros(codes.shape[0], 33, dtype=torch.long)
    mask = torch.zeros(codes.shape[0], 33, dtype=torch.bool)
    tokens[:, :-1] = codes
    mask[:, :-1] = True
    return tokens, mask


def encode_slices(mimi, audio: torch.Tensor, device) -> Iterator[torch.Tensor]:
    """Mimi codes [k, 32] of 24 kHz mono audio, ENCODE_SLICE_FRAMES frames per call, in the
    encoder's streaming state (the same codes as one call over all of it, in bounded pieces).
    The audio is padded with silence to a whole number of frames, as a one-shot encode does.
    Run it under torch.inference_mode(): a grad mode entered here would outlive each yield."""
    n = -(-audio.numel() // FRAME_SAMPLES) * FRAME_SAMPLES
    audio = F.pad(audio.float(), (0, n - audio.numel())).to(device)
    step = ENCODE_SLICE_FRAMES * FRAME_SAMPLES
    with mimi.streaming(1):
        mimi_graphs_off(mimi)  # the last slice may be shorter than the others
        for start in range(0, n, step):
            yield mimi.encode(audio[None, None, start:start + step])[0].T.cpu()  # [k, 32]


def fit_prompt(pieces: list, text: tuple, window: int, reserve: int):
    """Context pieces (oldest first) + the text rows -> (tokens, mask) [S, 33] that leave
    `reserve` positions for audio. Pieces that do not fit are dropped, oldest first, with a
    warning; a text that alone does not fit is a ValueError."""
    text_t, text_m = text
    if len(text_t) + reserve > window:
        raise ValueError(f"text is too long: {len(text_t)} tokens + {reserve} frames of audio "
                         f"exceed the {window}-position window; split the text or lower "
                         "max_audio_length_ms")
    budget = window - reserve - len(text_t)
    kept = []
    for tokens, mask in reversed(pieces):  # newest first
        if len(tokens) > budget:
            break
        kept.insert(0, (tokens, mask))
        budget -= len(tokens)
    if len(kept) < len(pieces):
        warnings.warn(f"context too long for the {window}-position window: dropped the "
                      f"{len(pieces) - len(kept)} oldest of {len(pieces)} segments", stacklevel=3)
    kept.append((text_t, text_m))
    return torch.cat([t for t, _ in kept]), torch.cat([m for _, m in kept])
