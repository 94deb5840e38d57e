"""CSM-1B: the backbone and depth decoder (Llama blocks, llama.py), the heads, and the frame step.

One audio frame (80 ms) = one backbone position + a 31-step depth decoder -> 32 Mimi codes.
Everything here has static shapes: caches are allocated once (`CSM.make_caches`) and written at
positions, never grown, so a frame step can be compiled and captured in a CUDA graph. The caches
belong to whoever runs the model (the plain Generator, each streaming engine), not to the
shared modules: two users of one model never resize each other's caches. Sampling is in
sampling.py; loading weights in checkpoints.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from csm_streaming.model.llama import KVCache, LlamaArgs, ModelCaches, Transformer
from csm_streaming.model.sampling import SamplingState, sample_topk


@dataclass(frozen=True)
class ModelArgs:
    backbone: LlamaArgs
    decoder: LlamaArgs
    text_vocab_size: int = 128_256
    audio_vocab_size: int = 2051
    audio_num_codebooks: int = 32


FLAVORS: dict[str, ModelArgs] = {
    "csm-1b": ModelArgs(
        backbone=LlamaArgs(num_layers=16, num_heads=32, num_kv_heads=8, dim=2048,
                           intermediate_dim=8192, max_seq_len=2048),
        decoder=LlamaArgs(num_layers=4, num_heads=8, num_kv_heads=2, dim=1024,
                          intermediate_dim=8192, max_seq_len=32),
    ),
    # Same classes, small enough for CPU tests in seconds. Codebooks and audio vocab stay real
    # so the Mimi codec (32 codebooks x 2048 codes) decodes what it generates.
    "tiny": ModelArgs(
        backbone=LlamaArgs(num_layers=2, num_heads=4, num_kv_heads=2, dim=64,
                           intermediate_dim=128, max_seq_len=512),
        decoder=LlamaArgs(num_layers=2, num_heads=4, num_kv_heads=2, dim=32,
                          intermediate_dim=64, max_seq_len=32),
        text_vocab_size=1024,
    ),
}


def prefill_block_size(device: torch.device) -> int:
    """Prompt positions run per backbone call. A prompt is always cut at the same positions, so
    spreading its blocks over engine steps computes exactly what one call after another does.
    About one frame step of work: on a CPU, 64 positions of the backbone cost about what one
    frame (a weight-bound step) costs; a GPU has the compute for far more."""
    return 256 if torch.device(device).type == "cuda" else 64


class CSM(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        bb, dec = args.backbone, args.decoder
        n, v = args.audio_num_codebooks, args.audio_vocab_size
        self.backbone = Transformer(bb)
        self.decoder = Transformer(dec)
        self.text_embeddings = nn.Embedding(args.text_vocab_size, bb.dim)
        self.audio_embeddings = nn.Embedding(v * n, bb.dim)
        self.projection = nn.Linear(bb.dim, dec.dim, bias=False)
        self.codebook0_head = nn.Linear(bb.dim, v, bias=False)
        self.audio_head = nn.Parameter(torch.empty(n - 1, dec.dim, v))
        self.audio_heads_int8: nn.ModuleList | None = None  # quantize.py's, when int8
        self.register_buffer("codebook_offsets", torch.arange(n) * v, persistent=False)

    # -- caches -------------------------------------------------------------------------------

    @property
    def window(self) -> int:
        """The backbone's context window in positions (2048 for CSM-1B)."""
        return self.args.backbone.max_seq_len

    def make_caches(self, batch: int, max_seq: int | None = None) -> ModelCaches:
        """Static KV caches for `batch` streams of up to `max_seq` positions, on the model's
        device and in its dtype. Allocate once: captured graphs hold their addresses."""
        p = next(self.parameters())
        seq = min(max_seq or self.window, self.window)
        bb, dec = self.args.backbone, self.args.decoder
        return ModelCaches(
            backbone=[KVCache(batch, bb, seq, p.dtype, p.device) for _ in range(bb.num_layers)],
            decoder=[KVCache(batch, dec, self.args.audio_num_codebooks, p.dtype, p.device)
                     for _ in range(dec.num_layers)],
            batch=batch, max_seq=seq)

    # -- embeddings ---------------------------------------------------------------------------

    def embed_tokens(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """tokens, mask [B, S, 33] (32 codebooks + text) -> [B, S, D]: sum of the used columns."""
        audio = self.audio_embeddings(tokens[..., :-1] + self.codebook_offsets)  # [B, S, 32, D]
        text = self.text_embeddings(tokens[..., -1:])  # [B, S, 1, D]
        embeds = torch.cat([audio, text], dim=-2) * mask.unsqueeze(-1).to(audio.dtype)
        return embeds.sum(dim=-2)

    def embed_frame(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, 32] -> [B, 1, D]: a generated frame fed back (all codebooks, no text)."""
        return self.audio_embeddings(codes + self.codebook_offsets).sum(dim=1, keepdim=True)

    def embed_audio(self, codebook: int, codes: torch.Tensor) -> torch.Tensor:
        """codes [B] of one codebook -> [B, D]."""
        return self.audio_embeddings(codes + codebook * self.args.audio_vocab_size)

    # -- the prompt ---------------------------------------------------------------------------

    def prefill_chunk(self, tokens: torch.Tensor, mask: torch.Tensor, caches: ModelCaches,
                      slot: int, start: int) -> torch.Tensor:
        """Run prompt rows [1, S, 33] at positions start..start+S-1 of cache row `slot`;
        return the last hidden state [1, D]. Earlier positions must already be in the cache."""
        end = start + tokens.shape[1]
        pos = torch.arange(start, end, device=tokens.device)[None]
        return self.backbone(self.embed_tokens(tokens, mask), pos, caches.backbone, slot,
                             seen=end)[:, -1]

    def prefill_rows(self, blocks: list[tuple[torch.Tensor, torch.Tensor, int, int]],
                     caches: ModelCaches) -> torch.Tensor:
        """Prompt blocks of several streams in one backbone call: (tokens [S, 33], mask, slot,
        start) each -> their last hidden states [B, D]. Shorter blocks are padded at their end
        with empty rows: what the padding writes lies past the block's last position, which
        its own queries cannot see and the stream's next positions overwrite before reading.
        Each row must fit: start + the longest block <= the cache length."""
        if len(blocks) == 1:
            tokens, mask, slot, start = blocks[0]
            return self.prefill_chunk(tokens[None], mask[None], caches, slot, start)
        longest = max(len(b[0]) for b in blocks)
        tokens = torch.stack([F.pad(b[0], (0, 0, 0, longest - len(b[0]))) for b in blocks])
        mask = torch.stack([F.pad(b[1], (0, 0, 0, longest - len(b[1]))) for b in blocks])
        device = tokens.device
        starts = torch.tensor([b[3] for b in blocks], device=device)
        pos = starts[:, None] + torch.arange(longest, device=device)[None]
        slots = torch.tensor([b[2] for b in blocks], device=device)
        h = self.backbone(self.embed_tokens(tokens, mask), pos, caches.backbone, slots,
                          seen=max(b[3] for b in blocks) + longest)
        last = torch.tensor([len(b[0]) - 1 for b in blocks], device=device)
        return h[torch.arange(len(blocks), device=device), last]

    def prefill(self, tokens: torch.Tensor, mask: torch.Tensor, caches: ModelCaches,
                slot: int) -> torch.Tensor:
        """A whole prompt [1, S, 33] at positions 0..S-1, in blocks of prefill_block_size."""
        block = prefill_block_size(tokens.device)
        for start in range(0, tokens.shape[1], block):
            h = self.prefill_chunk(tokens[:, start:start + block], mask[:, start:start + block],
                                   caches, slot, start)
        return h

    # -- the frame ----------------------------------------------------------------------------

    def backbone_step(self, codes: torch.Tensor, pos: torch.Tensor, caches: ModelCaches,
                      backbone=None, seen: int | None = None,
                      keys: torch.Tensor | None = None) -> torch.Tensor:
        """Feed one frame codes [B, 32] at positions pos [B]; return the next h [B, D].

        backbone: a compiled wrapper of self.backbone (the fast path), or None for eager.
        seen, keys: the cache positions the rows that matter attend to (Transformer.forward).
        """
        backbone = self.backbone if backbone is None else backbone
        return backbone(self.embed_frame(codes), pos[:, None], caches.backbone, seen=seen,
                        keys=keys)[:, -1]

    def depth_step(self, x: torch.Tensor, pos: torch.Tensor, caches: ModelCaches,
                   slot: int | None = None) -> torch.Tensor:
        """Embeddings x [B, P, D] at depth positions pos [B, P] -> the depth decoder's output
        at the last position [B, Dd]: the projection into it, then its layers."""
        return self.decoder(self.projection(x), pos, caches.decoder, slot)[:, -1]

    def sample_frame(self, h: torch.Tensor, s: SamplingState, caches: ModelCaches,
                     slot: int | None = None, depth=None, sample=None) -> torch.Tensor:
        """Backbone hidden h [B, D] -> the frame's 32 codes [B, 32] (codebook 0 + depth loop).

        The depth decoder starts empty each frame: positions 0..31 are rewritten and the causal
        mask hides what the previous frame left further on.
        depth, sample: compiled stand-ins for `depth_step` and `sample_topk` (the fast path), or
        None for eager.
        """
        n = self.args.audio_num_codebooks
        depth = self.depth_step if depth is None else depth
        sample = sample_topk if sample is None else sample
        dtype = h.dtype
        counter = s.frame * n
        c = sample(self.codebook0_head(h), s.temperature, s.top_k, s.seed, counter, s.candidates)
        codes = [c]
        x = torch.stack([h, self.embed_audio(0, c)], dim=1)  # [B, 2, D]
        pos = torch.arange(2, device=h.device)[None].expand(h.shape[0], 2)
        for i in range(1, n):
            out = depth(x, pos, caches, slot).to(dtype)  # [B, Dd]
            c = sample(self.audio_logits(out, i), s.temperature, s.top_k, s.seed, counter + i,
                       s.candidates)
            codes.append(c)
            x = self.embed_audio(i, c)[:, None]
            pos = pos[:, -1:] + 1
        return torch.stack(codes, dim=1)

    def audio_logits(self, out: torch.Tensor, i: int) -> torch.Tensor:
        """The depth decoder's output [B, Dd] -> codebook i's logits [B, V] (i in 1..31)."""
        if self.audio_heads_int8 is not None:
            return self.audio_heads_int8[i - 1](out)
        return out @ self.audio_head[i - 1]

    def generate_frame(self, tokens, mask, input_pos, sampling: SamplingState,
                       caches: ModelCaches, slot: int = 0) -> torch.Tensor:
        """The original release's step: tokens [1, S, 33] at input_pos [1, S] -> codes [1, 32].

        Runs the backbone over the new positions of one cache row and samples one frame. The
        plain reference loop uses it; the fast path calls `sample_frame` / `backbone_step`.
        """
        h = self.backbone(self.embed_tokens(tokens, mask), input_pos, caches.backbone, slot)[:, -1]
        return self.sample_frame(h, sampling, caches, slot)
