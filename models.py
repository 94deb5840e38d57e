"""CSM-1B in plain PyTorch: shapes, Llama blocks, static KV caches, the frame step, weight loading.

One audio frame (80 ms) = one backbone position + a 31-step depth decoder -> 32 Mimi codes.
Everything here has static shapes: caches are allocated once in `setup_caches` and written at
positions, never grown, so a frame step can be compiled and captured in a CUDA graph.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

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


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Interleaved RoPE (pairs x[2i], x[2i+1]) as in the original release, computed in fp32.

    x: [B, S, H, D]; cos, sin: [B, S, 1, D // 2].
    """
    xp = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xp[..., 0], xp[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1)
    return out.flatten(-2).type_as(x)


class KVCache(nn.Module):
    """Static cache [max_batch, kv_heads, max_seq, head_dim], written at positions."""

    def __init__(self, batch: int, args: LlamaArgs, max_seq: int, dtype, device):
        super().__init__()
        shape = (batch, args.num_kv_heads, max_seq, args.head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

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


class Attention(nn.Module):
    def __init__(self, args: LlamaArgs):
        super().__init__()
        self.args = args
        hd = args.head_dim
        self.q_proj = nn.Linear(args.dim, args.num_heads * hd, bias=False)
        self.k_proj = nn.Linear(args.dim, args.num_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(args.dim, args.num_kv_heads * hd, bias=False)
        self.output_proj = nn.Linear(args.num_heads * hd, args.dim, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(self, x, cos, sin, input_pos, mask, slot):
        b, s, _ = x.shape
        a = self.args
        q = apply_rope(self.q_proj(x).view(b, s, a.num_heads, a.head_dim), cos, sin)
        k = apply_rope(self.k_proj(x).view(b, s, a.num_kv_heads, a.head_dim), cos, sin)
        v = self.v_proj(x).view(b, s, a.num_kv_heads, a.head_dim)
        kc, vc = self.kv_cache.update(input_pos, k, v, slot)
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

    def forward(self, x, cos, sin, input_pos, mask, slot):
        x = x + self.attn(self.sa_norm(x), cos, sin, input_pos, mask, slot)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    """A Llama stack without embeddings or output head (CSM supplies both)."""

    def __init__(self, args: LlamaArgs):
        super().__init__()
        self.args = args
        self.layers = nn.ModuleList(Block(args) for _ in range(args.num_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        angles = torch.arange(args.max_seq_len).float()[:, None] * rope_frequencies(args)[None, :]
        self.register_buffer("rope_cos", angles.cos(), persistent=False)  # [L, D/2] fp32
        self.register_buffer("rope_sin", angles.sin(), persistent=False)
        self.cache_len = 0

    def setup_caches(self, batch: int, max_seq: int, dtype, device):
        self.cache_len = max_seq
        for layer in self.layers:
            layer.attn.kv_cache = KVCache(batch, self.args, max_seq, dtype, device)

    def forward(self, h: torch.Tensor, input_pos: torch.Tensor, slot: int | None = None):
        """h [B, S, D], input_pos [B, S] int64 -> [B, S, D]. slot: run on one cache row only."""
        if self.cache_len == 0:
            raise RuntimeError("call setup_caches() before running the model")
        cos = self.rope_cos[input_pos].unsqueeze(2)  # [B, S, 1, D/2]
        sin = self.rope_sin[input_pos].unsqueeze(2)
        # Each query sees the cache positions at or before its own; stale entries further on
        # (from an earlier, longer request in the same slot) are masked, so no reset is needed.
        keys = torch.arange(self.cache_len, device=h.device)
        mask = (keys[None, None, :] <= input_pos[:, :, None]).unsqueeze(1)  # [B, 1, S, L]
        for layer in self.layers:
            h = layer(h, cos, sin, input_pos, mask, slot)
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
        self.max_batch_size = 0

    # -- set-up -------------------------------------------------------------------------------

    def setup_caches(self, max_batch_size: int, max_seq_len: int | None = None):
        """Allocate static KV caches for `max_batch_size` streams (once; graphs hold them)."""
        p = next(self.parameters())
        seq = min(max_seq_len or self.args.backbone.max_seq_len, self.args.backbone.max_seq_len)
        self.backbone.setup_caches(max_batch_size, seq, p.dtype, p.device)
        self.decoder.setup_caches(max_batch_size, self.args.audio_num_codebooks, p.dtype, p.device)
        self.max_batch_size = max_batch_size

    @property
    def max_seq_len(self) -> int:
        return self.backbone.cache_len

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

    # -- the frame ----------------------------------------------------------------------------

    def prefill(self, tokens: torch.Tensor, mask: torch.Tensor, slot: int) -> torch.Tensor:
        """Run a prompt [1, S, 33] at positions 0..S-1 of cache row `slot`; return h [1, D]."""
        pos = torch.arange(tokens.shape[1], device=tokens.device)[None]
        return self.backbone(self.embed_tokens(tokens, mask), pos, slot=slot)[:, -1]

    def backbone_step(self, codes: torch.Tensor, pos: torch.Tensor, backbone=None) -> torch.Tensor:
        """Feed one frame codes [B, 32] at positions pos [B]; return the next h [B, D].

        backbone: a compiled wrapper of self.backbone (the fast path), or None for eager.
        """
        backbone = self.backbone if backbone is None else backbone
        return backbone(self.embed_frame(codes), pos[:, None])[:, -1]

    def sample_frame(self, h: torch.Tensor, s: SamplingState, slot: int | None = None,
                     decoder=None) -> torch.Tensor:
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
            out = decoder(self.projection(x), pos, slot).to(dtype)[:, -1]  # [B, Dd]
            c = sample_topk(out @ self.audio_head[i - 1], s.temperature, s.topk, s.seed, counter + i)
            codes.append(c)
            x = self.embed_audio(i, c)[:, None]
            pos = pos[:, -1:] + 1
        return torch.stack(codes, dim=1)

    def generate_frame(self, tokens, mask, input_pos, sampling: SamplingState,
                       slot: int = 0) -> torch.Tensor:
        """The original release's step: tokens [1, S, 33] at input_pos [1, S] -> codes [1, 32].

        Runs the backbone over the new positions of one cache row and samples one frame. The
        plain reference loop uses it; the fast path calls `sample_frame` / `backbone_step`.
        """
        h = self.backbone(self.embed_tokens(tokens, mask), input_pos, slot)[:, -1]
        return self.sample_frame(h, sampling, slot)


# ---------------------------------------------------------------------------------------------
# CPU: weights prepacked for a batch size
# ---------------------------------------------------------------------------------------------


class PackedLinear(nn.Module):
    """nn.Linear with its weight also prepacked by MKL for `batch` rows (CPU, fp32).

    Skinny matrix products (a few streams x a big weight) run ~2.5x faster packed on CPU; calls
    with another row count fall back to the plain weight inside the same MKL op, exactly.
    """

    def __init__(self, linear: nn.Linear, batch: int):
        super().__init__()
        self.weight = linear.weight  # same parameter, same state-dict key
        self.batch = batch
        self.register_buffer("packed", torch.ops.mkl._mkl_reorder_linear_weight(self.weight, batch),
                             persistent=False)

    def forward(self, x):
        return torch.ops.mkl._mkl_linear(x, self.packed, self.weight, None, self.batch)


def can_prepack(model: nn.Module) -> bool:
    p = next(model.parameters())
    return p.device.type == "cpu" and p.dtype == torch.float32 and torch._C.has_mkl


def _swap_layers(model: nn.Module, swap) -> int:
    """Replace each child module m by swap(m) where that gives a new module; count the swaps."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            new = swap(child)
            if new is not child:
                setattr(parent, name, new)
                count += 1
    return count


def _plain_linear(layer: PackedLinear) -> nn.Linear:
    lin = nn.Linear(layer.weight.shape[1], layer.weight.shape[0], bias=False, device="meta")
    lin.weight = layer.weight
    return lin


@torch.no_grad()
def prepack_linears(model: CSM, batch: int) -> int:
    """Swap every Linear of the frame step for a PackedLinear sized for `batch` rows."""
    if batch < 2 or not can_prepack(model):
        return 0

    def swap(m):
        if isinstance(m, nn.Linear):
            return PackedLinear(m, batch)
        if isinstance(m, PackedLinear) and m.batch != batch:
            return PackedLinear(_plain_linear(m), batch)
        return m

    return _swap_layers(model, swap)


def unpack_linears(model: CSM) -> int:
    """Undo prepack_linears (torch.compile traces plain Linear layers, not MKL's packed op)."""
    return _swap_layers(model, lambda m: _plain_linear(m) if isinstance(m, PackedLinear) else m)


# ---------------------------------------------------------------------------------------------
# Weights: the original format and the transformers format, detected from the tensor names
# ---------------------------------------------------------------------------------------------

ORIGINAL_MARKER = "backbone.layers.0.attn.q_proj.weight"
TRANSFORMERS_MARKER = "backbone_model.layers.0.self_attn.q_proj.weight"

_HF_TO_ORIGINAL = [  # applied in order, like transformers' own convert_csm.py but reversed
    (r"^backbone_model\.layers\.", "backbone.layers."),
    (r"^depth_decoder\.model\.layers\.", "decoder.layers."),
    (r"\.self_attn\.", ".attn."),
    (r"\.o_proj\.", ".output_proj."),
    (r"\.mlp\.gate_proj\.", ".mlp.w1."),
    (r"\.mlp\.down_proj\.", ".mlp.w2."),
    (r"\.mlp\.up_proj\.", ".mlp.w3."),
    (r"\.input_layernorm\.weight$", ".sa_norm.scale"),
    (r"\.post_attention_layernorm\.weight$", ".mlp_norm.scale"),
    (r"^backbone_model\.norm\.weight$", "backbone.norm.scale"),
    (r"^depth_decoder\.model\.norm\.weight$", "decoder.norm.scale"),
    (r"^embed_text_tokens\.", "text_embeddings."),
    (r"^backbone_model\.embed_tokens\.embed_audio_tokens\.", "audio_embeddings."),
    (r"^lm_head\.", "codebook0_head."),
    (r"^depth_decoder\.model\.inputs_embeds_projector\.", "projection."),
    (r"^depth_decoder\.codebooks_head\.weight$", "audio_head"),
]
# Tensors of the transformers checkpoint we do not use: the depth decoder's tied copy of the
# audio embeddings, and the codec (Mimi comes from moshi's loader, which streams).
_HF_SKIP = re.compile(r"^(depth_decoder\.model\.embed_tokens\.|codec_model\.)")


def unpermute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rotate-half Q/K rows (transformers) -> interleaved rows (original). w: [H * D, dim]."""
    out, dim = w.shape
    return w.view(n_heads, 2, out // n_heads // 2, dim).transpose(1, 2).reshape(out, dim)


def permute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Interleaved rows (original) -> rotate-half rows (transformers); inverse of the above."""
    out, dim = w.shape
    return w.view(n_heads, out // n_heads // 2, 2, dim).transpose(1, 2).reshape(out, dim)


def transformers_to_original(state: dict[str, torch.Tensor], args: ModelArgs) -> dict:
    """Rename a transformers CSM state dict to ours and undo its Q/K permutation."""
    state = dict(state)
    # The audio embeddings are tied; save_pretrained may keep only the depth decoder's copy.
    tied = "depth_decoder.model.embed_tokens.weight"
    state.setdefault("backbone_model.embed_tokens.embed_audio_tokens.weight", state.get(tied))
    out = {}
    for key, w in state.items():
        if w is None or _HF_SKIP.match(key):
            continue
        new = key
        for pattern, repl in _HF_TO_ORIGINAL:
            new = re.sub(pattern, repl, new)
        m = re.match(r"^(backbone|decoder)\.layers\.\d+\.attn\.(q|k)_proj\.weight$", new)
        if m:
            part = args.backbone if m.group(1) == "backbone" else args.decoder
            w = unpermute_rope_rows(w, part.num_heads if m.group(2) == "q" else part.num_kv_heads)
        out[new] = w
    return out


def original_to_transformers(state: dict[str, torch.Tensor], args: ModelArgs) -> dict:
    """The reverse mapping (used by tests to write transformers-format files from ours)."""
    inverse = {}
    for hf_key in _hf_keys(args):
        ours = hf_key
        for pattern, repl in _HF_TO_ORIGINAL:
            ours = re.sub(pattern, repl, ours)
        inverse[ours] = hf_key
    out = {}
    for key, w in state.items():
        m = re.match(r"^(backbone|decoder)\.layers\.\d+\.attn\.(q|k)_proj\.weight$", key)
        if m:
            part = args.backbone if m.group(1) == "backbone" else args.decoder
            w = permute_rope_rows(w, part.num_heads if m.group(2) == "q" else part.num_kv_heads)
        out[inverse[key]] = w
    out["depth_decoder.model.embed_tokens.weight"] = state["audio_embeddings.weight"]
    return out


def _hf_keys(args: ModelArgs) -> list[str]:
    keys = ["embed_text_tokens.weight", "backbone_model.embed_tokens.embed_audio_tokens.weight",
            "lm_head.weight", "depth_decoder.model.inputs_embeds_projector.weight",
            "depth_decoder.codebooks_head.weight", "backbone_model.norm.weight",
            "depth_decoder.model.norm.weight"]
    for prefix, part in (("backbone_model", args.backbone), ("depth_decoder.model", args.decoder)):
        for i in range(part.num_layers):
            base = f"{prefix}.layers.{i}."
            keys += [base + f"self_attn.{p}_proj.weight" for p in "qkvo"]
            keys += [base + f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")]
            keys += [base + "input_layernorm.weight", base + "post_attention_layernorm.weight"]
    return keys


def args_from_hf_config(cfg: dict) -> ModelArgs:
    """ModelArgs from a transformers CsmConfig dict (config.json)."""
    dec = cfg.get("depth_decoder_config") or {}

    def part(c: dict, max_seq: int) -> LlamaArgs:
        rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
        theta = rope.get("rope_theta", c.get("rope_theta", 500_000.0))
        scaling = None
        if rope.get("rope_type", rope.get("type")) == "llama3":
            scaling = RopeScaling(
                factor=float(rope["factor"]),
                low_freq_factor=float(rope["low_freq_factor"]),
                high_freq_factor=float(rope["high_freq_factor"]),
                original_max_position_embeddings=int(rope["original_max_position_embeddings"]))
        heads = c["num_attention_heads"]
        if c.get("head_dim") not in (None, c["hidden_size"] // heads):
            raise ValueError(f"head_dim {c['head_dim']} != hidden_size / heads is not supported")
        return LlamaArgs(num_layers=c["num_hidden_layers"], num_heads=heads,
                         num_kv_heads=c.get("num_key_value_heads", heads), dim=c["hidden_size"],
                         intermediate_dim=c["intermediate_size"], max_seq_len=max_seq,
                         norm_eps=c.get("rms_norm_eps", 1e-5), rope_base=float(theta),
                         rope_scaling=scaling)

    n = cfg.get("num_codebooks", 32)
    return ModelArgs(backbone=part(cfg, cfg.get("max_position_embeddings", 2048)),
                     decoder=part(dec, n), text_vocab_size=cfg.get("text_vocab_size", 128_256),
                     audio_vocab_size=cfg.get("vocab_size", 2051), audio_num_codebooks=n)


def _flavor_from_shapes(state: dict[str, torch.Tensor]) -> ModelArgs:
    for args in FLAVORS.values():
        want = {"text_embeddings.weight": (args.text_vocab_size, args.backbone.dim),
                "projection.weight": (args.decoder.dim, args.backbone.dim),
                "backbone.layers.0.mlp.w1.weight": (args.backbone.intermediate_dim, args.backbone.dim),
                "decoder.layers.0.mlp.w1.weight": (args.decoder.intermediate_dim, args.decoder.dim)}
        n_bb = len({k.split(".")[2] for k in state if k.startswith("backbone.layers.")})
        n_dec = len({k.split(".")[2] for k in state if k.startswith("decoder.layers.")})
        if (all(tuple(state[k].shape) == v for k, v in want.items())
                and (n_bb, n_dec) == (args.backbone.num_layers, args.decoder.num_layers)):
            return args
    raise ValueError("original-format checkpoint with shapes of no known flavour and no config.json "
                     "beside it: put the checkpoint's config.json in the same folder")


def _read_tensors(files: list[Path]) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in files:
        if f.suffix == ".safetensors":
            state.update(load_file(str(f)))
        else:  # ckpt.pt: a plain state dict (torch.save), loaded without executing code
            obj = torch.load(f, map_location="cpu", weights_only=True)
            state.update(obj.get("model", obj) if isinstance(obj, dict) else obj)
    return state


def checkpoint_files(folder: Path) -> list[Path]:
    """The weight files of a checkpoint folder; the original format is preferred when both exist."""
    index = folder / "transformers.safetensors.index.json"
    for name in ("model.safetensors", "ckpt.safetensors", "ckpt.pt"):
        if (folder / name).is_file():
            return [folder / name]
    for idx in (index, folder / "model.safetensors.index.json"):
        if idx.is_file():
            shards = sorted(set(json.loads(idx.read_text())["weight_map"].values()))
            return [folder / s for s in shards]
    raise FileNotFoundError(
        f"no CSM weights in {folder}: expected model.safetensors, ckpt.pt or "
        "transformers.safetensors.index.json with its shards")


def load_state(files: list[Path], config: dict | None) -> tuple[ModelArgs, dict, str]:
    """Read weight files, detect their format, return (args, state dict in our names, format)."""
    state = _read_tensors(files)
    if ORIGINAL_MARKER in state:
        args = args_from_hf_config(config) if config else _flavor_from_shapes(state)
        return args, state, "original"
    if TRANSFORMERS_MARKER in state:
        if config is None:
            raise ValueError("transformers-format CSM weights need their config.json beside them")
        args = args_from_hf_config(config)
        return args, transformers_to_original(state, args), "transformers"
    raise ValueError(f"{files[0]} holds no CSM weights: neither '{ORIGINAL_MARKER}' "
                     f"(original format) nor '{TRANSFORMERS_MARKER}' (transformers format) found")


def build_model(args: ModelArgs, state: dict | None, device, dtype) -> CSM:
    """Build CSM on `device` in `dtype`; random init (std 0.02) when `state` is None."""
    with torch.device("meta"):
        model = CSM(args)
    model = model.to_empty(device=device)
    # Buffers are not in checkpoints: recompute them on the real device.
    for part in (model.backbone, model.decoder):
        angles = (torch.arange(part.args.max_seq_len, device=device).float()[:, None]
                  * rope_frequencies(part.args).to(device)[None, :])
        part.rope_cos, part.rope_sin = angles.cos(), angles.sin()
    model.codebook_offsets = torch.arange(args.audio_num_codebooks, device=device) * args.audio_vocab_size
    model = model.to(dtype=dtype)
    if state is None:
        init_random(model)
    else:
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"checkpoint does not match the model: missing {sorted(missing)[:5]}, "
                             f"unexpected {sorted(unexpected)[:5]}")
    return model.eval().requires_grad_(False)


@torch.no_grad()
def init_random(model: CSM, seed: int = 0):
    """Normal(0, 0.02) weights, unit norms; in place, in the model's dtype, on its device."""
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith(".scale"):
            p.fill_(1.0)
        else:
            p.normal_(0.0, 0.02, generator=g)
