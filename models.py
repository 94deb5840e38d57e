"""CSM-1B in plain PyTorch: shapes, Llama blocks, static KV caches, sampling, the frame step.

One audio frame (80 ms) = one backbone position + a 31-step depth decoder -> 32 Mimi codes.
Everything here has static shapes: caches are allocated once (`CSM.make_caches`) and written at
positions, never grown, so a frame step can be compiled and captured in a CUDA graph. The caches
belong to whoever runs the model (the plain Generator, each streaming engine), not to the
shared modules: two users of one model never resize each other's caches. Loading weights is in
checkpoints.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------
# Shapes
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 frequency scaling (torchtune's Llama3ScaledRoPE)."""

    factor: float = 32.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class LlamaArgs:
    num_layers: int
    num_heads: int
    num_kv_heads: int
    dim: int
    intermediate_dim: int
    max_seq_len: int
    norm_eps: float = 1e-5
    rope_base: float = 500_000.0
    rope_scaling: RopeScaling | None = RopeScaling()

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads


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


# ---------------------------------------------------------------------------------------------
# Llama blocks
# ---------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 like torchtune, then return to the activation dtype.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return x32.type_as(x) * self.scale


def rope_frequencies(args: LlamaArgs) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2], Llama-3 scaled when `args.rope_scaling` is set."""
    hd = args.head_dim
    freqs = 1.0 / (args.rope_base ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    s = args.rope_scaling
    if s is None:
        return freqs.float()
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / freqs
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor)
    mid = (1 - smooth) * freqs / s.factor + smooth * freqs
    scaled = torch.where(wavelen < high_wavelen, freqs,
                         torch.where(wavelen > low_wavelen, freqs / s.factor, mid))
    return scaled.float()


def rope_tables(args: LlamaArgs, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every position's angles, [max_seq_len, head_dim // 2], computed in fp32."""
    angles = (torch.arange(args.max_seq_len, device=device).float()[:, None]
              * rope_frequencies(args).to(device)[None, :])
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Interleaved RoPE (pairs x[2i], x[2i+1]) as in the original release, computed in fp32.

    x: [B, S, H, D]; cos, sin: [B, S, 1, D // 2].
    """
    xp = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xp[..., 0], xp[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1)
    return out.flatten(-2).type_as(x)


class KVCache:
    """One layer's static cache [batch, kv_heads, max_seq, head_dim], written at positions."""

    def __init__(self, batch: int, args: LlamaArgs, max_seq: int, dtype, device):
        shape = (batch, args.num_kv_heads, max_seq, args.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_seq = max_seq

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot: int | None):
        """Write k, v [B, S, Hkv, D] at input_pos [B, S]; return the caches the batch attends to."""
        if slot is not None:  # one row: prefill and the plain loop
            kc, vc = self.k[slot:slot + 1], self.v[slot:slot + 1]
        else:  # the leading rows: the engine steps the smallest batch bucket holding its streams
            kc, vc = self.k[:k.shape[0]], self.v[:k.shape[0]]
        rows = torch.arange(k.shape[0], device=k.device)[:, None]
        kc[rows, :, input_pos] = k
        vc[rows, :, input_pos] = v
        return kc, vc


@dataclass
class ModelCaches:
    """The KV caches of one user of a model: `batch` rows (streams) of `max_seq` positions."""

    backbone: list[KVCache]
    decoder: list[KVCache]
    batch: int
    max_seq: int


class Attention(nn.Module):
    def __init__(self, args: LlamaArgs):
        super().__init__()
        self.args = args
        hd = args.head_dim
        self.q_proj = nn.Linear(args.dim, args.num_heads * hd, bias=False)
        self.k_proj = nn.Linear(args.dim, args.num_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(args.dim, args.num_kv_heads * hd, bias=False)
        self.output_proj = nn.Linear(args.num_heads * hd, args.dim, bias=False)

    def forward(self, x, cos, sin, input_pos, mask, cache: KVCache, slot):
        b, s, _ = x.shape
        a = self.args
        q = apply_rope(self.q_proj(x).view(b, s, a.num_heads, a.head_dim), cos, sin)
        k = apply_rope(self.k_proj(x).view(b, s, a.num_kv_heads, a.head_dim), cos, sin)
        v = self.v_proj(x).view(b, s, a.num_kv_heads, a.head_dim)
        kc, vc = cache.update(input_pos, k, v, slot)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), kc, vc, attn_mask=mask,
                                           enable_gqa=a.num_heads != a.num_kv_heads)
        return self.output_proj(y.transpose(1, 2).reshape(b, s, -1))


class MLP(nn.Module):
    def __init__(self, args: LlamaArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.intermediate_dim, bias=False)  # gate
        self.w2 = nn.Linear(args.intermediate_dim, args.dim, bias=False)  # down
        self.w3 = nn.Linear(args.dim, args.intermediate_dim, bias=False)  # up

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, args: LlamaArgs):
        super().__init__()
        self.sa_norm = RMSNorm(args.dim, args.norm_eps)
        self.attn = Attention(args)
        self.mlp_norm = RMSNorm(args.dim, args.norm_eps)
        self.mlp = MLP(args)

    def forward(self, x, cos, sin, input_pos, mask, cache, slot):
        x = x + self.attn(self.sa_norm(x), cos, sin, input_pos, mask, cache, slot)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    """A Llama stack without embeddings or output head (CSM supplies both)."""

    def __init__(self, args: LlamaArgs):
        super().__init__()
        self.args = args
        self.layers = nn.ModuleList(Block(args) for _ in range(args.num_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        cos, sin = rope_tables(args)
        # [max_seq_len, D/2]. Computed in fp32, then cast with the model to its dtype by
        # checkpoints.build_model (bf16 on a GPU), as the original release's torchtune RoPE
        # cache is: the rotation itself runs in fp32 (apply_rope).
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, h: torch.Tensor, input_pos: torch.Tensor, caches: list[KVCache],
                slot: int | None = None):
        """h [B, S, D], input_pos [B, S] int64 -> [B, S, D]. slot: run on one cache row only."""
        cos = self.rope_cos[input_pos].unsqueeze(2)  # [B, S, 1, D/2]
        sin = self.rope_sin[input_pos].unsqueeze(2)
        # Each query sees the cache positions at or before its own; stale entries further on
        # (from an earlier, longer request in the same slot) are masked, so no reset is needed.
        keys = torch.arange(caches[0].max_seq, device=h.device)
        mask = (keys[None, None, :] <= input_pos[:, :, None]).unsqueeze(1)  # [B, 1, S, L]
        for layer, cache in zip(self.layers, caches):
            h = layer(h, cos, sin, input_pos, mask, cache, slot)
        return self.norm(h)


# ---------------------------------------------------------------------------------------------
# Sampling: top-k with per-stream temperature and k, and a counter-based random draw
# ---------------------------------------------------------------------------------------------

_MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for int64 x in [0, 2**32), without int64 overflow."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _MASK32


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer (lowbias32) on int64 tensors holding values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def exponential_noise(seed: torch.Tensor, counter: torch.Tensor, vocab: int) -> torch.Tensor:
    """Exp(1) noise [B, vocab] that depends only on (seed, counter, token) of each stream.

    A stream's draws do not depend on which batch row it sits in or what else runs beside it,
    so a batched stream reproduces its solo run, and the fast path its reference, at any top-k.
    seed, counter: [B] int64.
    """
    key = hash32(hash32(seed & _MASK32) ^ (counter & _MASK32))  # [B]
    tokens = torch.arange(vocab, device=seed.device)
    bits = hash32(key[:, None] ^ hash32(tokens)[None, :])
    # 23 bits: (k + 0.5) / 2**23 is exact in float32, so u stays strictly inside (0, 1) and the
    # noise is never 0 (with 24 bits the top value rounds to u = 1, q = 0 and p / q = inf).
    u = ((bits >> 9).float() + 0.5) * (1.0 / (1 << 23))
    return -torch.log(u)


MIMI_CODES = 2048  # Mimi's codebook size; ids 2048..2050 of the 2051-way heads are never audio

# End of speech. The release stops at a frame whose 32 codes are all 0. Sampled at T=0.9 the 31
# depth codes of that frame are not always all 0, and the stream then runs on as a silent tail
# (csm#122). Codebook 0 (the backbone's choice) must be 0, and at least EOS_MIN_ZERO_CODES of the
# 32 codes: a real speech frame has almost never 24 zero codes, a missed end frame almost always.
EOS_MIN_ZERO_CODES = 24


def is_eos(codes: torch.Tensor, min_zero_codes: int = EOS_MIN_ZERO_CODES) -> torch.Tensor:
    """codes [..., 32] -> bool [...]: does this frame end the speech?"""
    return (codes[..., 0] == 0) & ((codes == 0).sum(-1) >= min_zero_codes)


def sample_topk(logits: torch.Tensor, temperature: torch.Tensor, topk: torch.Tensor,
                seed: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    """logits [B, V]; temperature [B] float; topk [B] int64; seed, counter [B] -> [B] int64.

    Multinomial draw over the top-k of softmax(logits / T) with the exponential trick
    (argmax(p / q), q ~ Exp(1)): no host sync, no generator state. Ids Mimi cannot decode
    (>= 2048) are never drawn.
    """
    logits = logits.float() / temperature[:, None]
    logits[:, MIMI_CODES:] = float("-inf")
    kth = logits.sort(dim=-1, descending=True).values.gather(-1, (topk[:, None] - 1))
    logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    q = exponential_noise(seed, counter, logits.shape[-1])
    return torch.argmax(probs / q, dim=-1)


@dataclass
class SamplingState:
    """Per-stream sampling tensors [B]; fixed addresses so one captured step serves all."""

    temperature: torch.Tensor  # float32
    topk: torch.Tensor  # int64
    seed: torch.Tensor  # int64 in [0, 2**32)
    frame: torch.Tensor  # int64, frames drawn so far (the counter of the random draw)

    def rows(self, n: int) -> SamplingState:
        """Views of the first n rows (in-place updates reach the full tensors)."""
        return SamplingState(self.temperature[:n], self.topk[:n], self.seed[:n], self.frame[:n])

    @classmethod
    def empty(cls, batch: int, device) -> SamplingState:
        return cls(torch.ones(batch, device=device),
                   torch.ones(batch, dtype=torch.long, device=device),
                   torch.zeros(batch, dtype=torch.long, device=device),
                   torch.zeros(batch, dtype=torch.long, device=device))


# ---------------------------------------------------------------------------------------------
# CSM
# ---------------------------------------------------------------------------------------------


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
        pos = torch.arange(start, start + tokens.shape[1], device=tokens.device)[None]
        return self.backbone(self.embed_tokens(tokens, mask), pos, caches.backbone, slot)[:, -1]

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
                      backbone=None) -> torch.Tensor:
        """Feed one frame codes [B, 32] at positions pos [B]; return the next h [B, D].

        backbone: a compiled wrapper of self.backbone (the fast path), or None for eager.
        """
        backbone = self.backbone if backbone is None else backbone
        return backbone(self.embed_frame(codes), pos[:, None], caches.backbone)[:, -1]

    def sample_frame(self, h: torch.Tensor, s: SamplingState, caches: ModelCaches,
                     slot: int | None = None, decoder=None) -> torch.Tensor:
        """Backbone hidden h [B, D] -> the frame's 32 codes [B, 32] (codebook 0 + depth loop).

        The depth decoder starts empty each frame: positions 0..31 are rewritten and the causal
        mask hides what the previous frame left further on.
        """
        n = self.args.audio_num_codebooks
        decoder = self.decoder if decoder is None else decoder
        dtype = h.dtype
        counter = s.frame * n
        c = sample_topk(self.codebook0_head(h), s.temperature, s.topk, s.seed, counter)
        codes = [c]
        x = torch.stack([h, self.embed_audio(0, c)], dim=1)  # [B, 2, D]
        pos = torch.arange(2, device=h.device)[None].expand(h.shape[0], 2)
        for i in range(1, n):
            out = decoder(self.projection(x), pos, caches.decoder, slot).to(dtype)[:, -1]  # [B, Dd]
            c = sample_topk(out @ self.audio_head[i - 1], s.temperature, s.topk, s.seed,
                            counter + i)
            codes.append(c)
            x = self.embed_audio(i, c)[:, None]
            pos = pos[:, -1:] + 1
        return torch.stack(codes, dim=1)

    def generate_frame(self, tokens, mask, input_pos, sampling: SamplingState,
                       caches: ModelCaches, slot: int = 0) -> torch.Tensor:
        """The original release's step: tokens [1, S, 33] at input_pos [1, S] -> codes [1, 32].

        Runs the backbone over the new positions of one cache row and samples one frame. The
        plain reference loop uses it; the fast path calls `sample_frame` / `backbone_step`.
        """
        h = self.backbone(self.embed_tokens(tokens, mask), input_pos, caches.backbone, slot)[:, -1]
        return self.sample_frame(h, sampling, caches, slot)
