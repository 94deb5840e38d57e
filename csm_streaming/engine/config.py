"""How the model loads (LoadOptions) and the streaming engine's settings (StreamingConfig):
capture-time constants, checked when made.

Built from argparse at the entry points (the CLI, the server); honoured kill switches:
NO_TORCH_COMPILE=1 and NO_CUDA_GRAPH=1.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from csm_streaming.audio import FRAME_MS
from csm_streaming.model.hub import DEFAULT_REPO, is_random_model
from csm_streaming.request import DEFAULT_MAX_AUDIO_MS

RANDOM_MODEL_MAX_AUDIO_MS = 3_000  # random weights never say "end": keep their default short


def env_off(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


@dataclass(frozen=True)
class StreamingConfig:
    """Capture-time settings of the engine; validated on creation.

    chunk_size_ms: audio per yielded chunk (a multiple of 80 ms). The host looks at the device
        once per chunk, so larger chunks mean fewer syncs and later audio.
    first_chunk_ms: the first chunk of each stream, small so that sound starts early.
    frame_batch_size: frames Mimi decodes per call (then it divides both chunk sizes); None: a
        chunk's frames in one call, the fastest (a call's cost is mostly fixed: on a 2-core CPU
        1 frame a call costs 7x the time per frame of 8 a call).
    max_batch_size: streams that advance together in one frame step (static cache rows).
    rtf_target: the real-time factor the caller wants to hold; playback sizes its prebuffer on it.
    max_seq_len: backbone window (positions); at most the model's 2048.
    prep_budget_steps: prompt work (context encoding, prefill) done between two chunks while
        streams run is the chunk's slack (its audio time minus the time it took, so running
        streams stay ahead of real time), and at least this many frame steps (so new requests
        always progress; at least one unit of work is always done).
    """

    chunk_size_ms: int = 320
    first_chunk_ms: int = 160
    frame_batch_size: int | None = None
    enable_compilation: bool | None = None  # None: on CUDA only (minutes to build on a CPU)
    enable_cuda_graphs: bool = True
    cpu_weight_prepack: bool = True  # the fastest matrix kernel measured on this CPU (fp32)
    rtf_target: float = 0.5
    max_batch_size: int = 1
    max_seq_len: int | None = None
    max_segment_chars: int = 250
    watermark_window_ms: int = 2000  # largest window the stream watermark marks at once
    prep_budget_steps: float = 1.0

    def __post_init__(self):
        for name in ("chunk_size_ms", "first_chunk_ms"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0 or v % FRAME_MS:
                raise ValueError(f"{name} must be a positive multiple of {FRAME_MS} ms (got {v!r})")
        fb = self.frame_batch_size
        if fb is not None and (isinstance(fb, bool) or not isinstance(fb, int) or fb < 1):
            raise ValueError(f"frame_batch_size must be an integer >= 1 or None (got {fb!r})")
        for name in ("chunk_size_ms", "first_chunk_ms"):
            if fb is not None and (getattr(self, name) // FRAME_MS) % fb:
                raise ValueError(f"frame_batch_size ({fb}) must divide {name} in frames "
                                 f"({getattr(self, name) // FRAME_MS})")
        mb = self.max_batch_size
        if isinstance(mb, bool) or not isinstance(mb, int) or mb < 1:
            raise ValueError(f"max_batch_size must be an integer >= 1 (got {mb!r})")
        if not (isinstance(self.rtf_target, (int, float)) and 0 < self.rtf_target <= 10):
            raise ValueError(f"rtf_target must be in (0, 10] (got {self.rtf_target!r})")
        if self.max_seq_len is not None and not (64 <= self.max_seq_len <= 2048):
            raise ValueError(f"max_seq_len must be in [64, 2048] (got {self.max_seq_len!r})")
        if self.max_segment_chars < 20:
            raise ValueError("max_segment_chars must be at least 20")
        if not 0 < self.prep_budget_steps <= 100:
            raise ValueError(
                f"prep_budget_steps must be in (0, 100] (got {self.prep_budget_steps!r})"
            )

    @property
    def chunk_frames(self) -> int:
        return self.chunk_size_ms // FRAME_MS

    @property
    def first_chunk_frames(self) -> int:
        return self.first_chunk_ms // FRAME_MS

    def compile_enabled(self, device: torch.device | None = None) -> bool:
        wanted = self.enable_compilation
        if wanted is None:
            wanted = device is not None and device.type == "cuda"
        return wanted and not env_off("NO_TORCH_COMPILE")

    def cuda_graphs_enabled(self, device: torch.device) -> bool:
        return self.enable_cuda_graphs and device.type == "cuda" and not env_off("NO_CUDA_GRAPH")


@dataclass(frozen=True)
class LoadOptions:
    """How `load_csm_1b` loads CSM-1B, and what the Generator it returns does by default.

    model: a hub repo id (default: the ungated copy; `sesame/csm-1b` for the official gated
    one), a local folder or weight file (both checkpoint formats), or `random:csm-1b` /
    `random:tiny` for random weights with no download. mimi: None (Kyutai's release), a local
    file, a repo id, or 'random' (the default for random models). Random models also get a
    watermark model with random weights (the stage runs, the mark means nothing; random:tiny's
    is small, as its model is) and a short default length (RANDOM_MODEL_MAX_AUDIO_MS): they
    never emit the end frame. quantize: None, 'int8' (CPU, MPS, CUDA) or 'int4' (CPU)
    weight-only quantization, see model/quantize.py; dtype='int8' / 'int4' says the same.
    dtype: a torch.dtype, 'fp32', 'bf16', or 'auto' (on a CPU the fastest of the two, and of
    int8 when quantize='int8' was asked for, measured: see pick_dtype); None: bf16 on CUDA,
    fp32 elsewhere. weight_cache: int8 weights are kept on disk after their first load and read
    from there on the next (model/weight_cache.py; CSM_CACHE_DIR says where); False: neither.
    """

    model: str = DEFAULT_REPO
    mimi: str | None = None
    dtype: torch.dtype | str | None = None
    quantize: str | None = None
    weight_cache: bool = True
    watermark: bool = True
    watermark_key: object = None
    allow_cpu_fallback: bool = False
    normalize: bool = True  # spell out numbers and symbols (normalize.py)

    @property
    def default_max_audio_ms(self) -> float:
        """Random weights never say "end": their default length is short."""
        return RANDOM_MODEL_MAX_AUDIO_MS if is_random_model(self.model) else DEFAULT_MAX_AUDIO_MS


# ---------------------------------------------------------------------------------------------
# The generator
# ---------------------------------------------------------------------------------------------
