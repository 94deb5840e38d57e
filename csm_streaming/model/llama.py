"""Llama blocks of our own (torchtune stopped active development): shapes, RMSNorm, Llama-3
RoPE applied interleaved as the original, static KV caches written at positions, SwiGLU."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


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



# ---------------------------------------------------------------------------------------------
# Llama blocks
# ---------------------------------------------------------------------------------------------


# A cut attention (Transformer.forward's `seen`) reads whole blocks of this many cache
# positions: torch's CPU attention sums keys in blocks of 512 (fewer when the cache is shorter),
# so a cache cut at a multiple of 512 adds up the seen positions in the same order as the whole
# window, and a row attends the same way alone or beside further ones (what lies past its own
# position is masked: a block of it adds exact zeros). Cut anywhere, bf16 sums came out
# different from the whole window's by ~1e-3.
ATTENTION_BLOCK = 512


def attended_length(window: int, seen: int | None) -> int:
    """Cache positions an attention reads to see the first `seen` (all when None): whole
    blocks, the same sums as over the whole window (ATTENTION_BLOCK)."""
    if seen is None:
        return window
    return min(window, -(-seen // ATTENTION_BLOCK) * ATTENTION_BLOCK)


def attended_keys(window: int, seen: int, device=None) -> torch.Tensor:
    """The positions a cut attention reads (Transformer.forward's `keys`), their length marked
    dynamic for torch.compile where it can change: every cut runs one compiled graph."""
    keys = torch.arange(attended_length(window, seen), device=device)
    if window > ATTENTION_BLOCK:
        torch._dynamo.mark_dynamic(keys, 0, min=ATTENTION_BLOCK, max=window)
    return keys


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
    """One layer's static cache [batch, kv_heads, max_seq, head_dim], written at positions.

    Its storage holds one position more than max_seq, never written or read: the attention
    reads a slice of the positions (Transformer.forward), and with the spare one even the whole
    window is a strict slice. A compiled graph whose cut length is dynamic (`attended_keys`)
    then serves every cut; where a cut could equal the storage, dynamo's contiguity guard on it
    split the whole window into a graph of its own (compiled mid-stream)."""

    def __init__(self, batch: int, args: LlamaArgs, max_seq: int, dtype, device):
        shape = (batch, args.num_kv_heads, max_seq + 1, args.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_seq = max_seq

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               slot: int | torch.Tensor | None):
        """Write k, v [B, S, Hkv, D] at input_pos [B, S]; return the caches the batch attends to.
        slot: an int (one row), a tensor [B] of rows (prompts of several streams at once), or
        None (the leading B rows)."""
        if isinstance(slot, torch.Tensor):  # rows anywhere: written in place, read as a copy
            self.k[slot[:, None], :, input_pos] = k
            self.v[slot[:, None], :, input_pos] = v
            return self.k[slot], self.v[slot]
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


def stacked_linear(module: nn.Module, name: str, in_dim: int, parts: dict[str, int]) -> nn.Linear:
    """One Linear named `name` for the checkpoint's Linears `parts` (name -> outputs), their rows
    stacked in that order: one matrix product (one weight read, one kernel call) instead of
    several that share their input. State dicts in and out keep the parts' names, so both
    checkpoint formats and the transformers port see the model they know."""
    keys = list(parts)

    def load(mod, state, prefix, *_):
        found = [f"{prefix}{k}.weight" for k in keys]
        if all(k in state for k in found):
            state[f"{prefix}{name}.weight"] = torch.cat([state.pop(k) for k in found])

    def save(mod, state, prefix, _metadata):
        weight = state.pop(f"{prefix}{name}.weight", None)
        if weight is not None:  # a plain Linear (quantized layers keep their own names)
            for k, piece in zip(keys, weight.split(list(parts.values()))):
                state[f"{prefix}{k}.weight"] = piece

    module.register_load_state_dict_pre_hook(load)
    module.register_state_dict_post_hook(save)
    linear = nn.Linear(in_dim, sum(parts.values()), bias=False)
    linear.stacked_parts = keys  # for stack_checkpoint_parts
    return linear


def stack_checkpoint_parts(model: nn.Module, state: dict):
    """The checkpoint's separate Linears joined under their stacked names in `state`, in place:
    what load_state_dict's hooks do, for a caller that writes the model tensor by tensor."""
    for name, m in model.named_modules():
        parts = getattr(m, "stacked_parts", None)
        if parts:
            prefix = name.rpartition(".")[0]
            found = [f"{prefix}.{k}.weight" if prefix else f"{k}.weight" for k in parts]
            if all(k in state for k in found):
                state[f"{name}.weight"] = torch.cat([state.pop(k) for k in found])


class Attention(nn.Module):
    def __init__(self, args: LlamaArgs):
        super().__init__()
        self.args = args
        hd = args.head_dim
        self.sizes = [args.num_heads * hd, args.num_kv_heads * hd, args.num_kv_heads * hd]
        self.qkv_proj = stacked_linear(self, "qkv_proj", args.dim, dict(
            zip(("q_proj", "k_proj", "v_proj"), self.sizes)))
        self.output_proj = nn.Linear(args.num_heads * hd, args.dim, bias=False)

    def forward(self, x, rope, input_pos, mask, cache: KVCache, slot):
        """rope: (cos, sin) [B, S, 1, D/2] at the queries' positions."""
        b, s, _ = x.shape
        a, (cos, sin) = self.args, rope
        q, k, v = self.qkv_proj(x).split(self.sizes, dim=-1)
        q = apply_rope(q.view(b, s, a.num_heads, a.head_dim), cos, sin)
        k = apply_rope(k.view(b, s, a.num_kv_heads, a.head_dim), cos, sin)
        v = v.view(b, s, a.num_kv_heads, a.head_dim)
        kc, vc = cache.update(input_pos, k, v, slot)
        seen = mask.shape[-1]  # the leading cache positions any query can see (see Transformer)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), kc[:, :, :seen], vc[:, :, :seen],
                                           attn_mask=mask,
                                           enable_gqa=a.num_heads != a.num_kv_heads)
        return self.output_proj(y.transpose(1, 2).reshape(b, s, -1))


class MLP(nn.Module):
    def __init__(self, args: LlamaArgs):
        super().__init__()
        inter = args.intermediate_dim
        self.w13 = stacked_linear(self, "w13", args.dim, {"w1": inter, "w3": inter})  # gate, up
        self.w2 = nn.Linear(inter, args.dim, bias=False)  # down

    def forward(self, x):
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, args: LlamaArgs):
        super().__init__()
        self.sa_norm = RMSNorm(args.dim, args.norm_eps)
        self.attn = Attention(args)
        self.mlp_norm = RMSNorm(args.dim, args.norm_eps)
        self.mlp = MLP(args)

    def forward(self, x, rope, input_pos, mask, cache, slot):
        x = x + self.attn(self.sa_norm(x), rope, input_pos, mask, cache, slot)
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
                slot: int | None = None, seen: int | None = None,
                keys: torch.Tensor | None = None):
        """h [B, S, D], input_pos [B, S] int64 -> [B, S, D]. slot: the cache rows (KVCache).

        seen: attend to the leading `seen` cache positions only (all when None), for a caller
        that knows on the host that the queries that matter lie before it: the attention reads
        that much of the cache instead of the whole window (a frame early in a 2048-position
        window read 8 MB per backbone layer for a few hundred positions). Rows whose queries
        lie further on (parked streams) see a cut cache: their outputs must not be used.
        keys: the same cut for a compiled caller, as the positions attended
        (`attended_keys`), whose length a graph takes as a dynamic size: one graph for every
        cut. CUDA graphs pass neither: the whole window."""
        rope = (self.rope_cos[input_pos].unsqueeze(2),  # [B, S, 1, D/2]
                self.rope_sin[input_pos].unsqueeze(2))
        # Each query sees the cache positions at or before its own; stale entries further on
        # (from an earlier, longer request in the same slot) are masked, so no reset is needed.
        if keys is None:
            keys = torch.arange(attended_length(caches[0].max_seq, seen), device=h.device)
        mask = (keys[None, None, :] <= input_pos[:, :, None]).unsqueeze(1)  # [B, 1, S, L]
        for layer, cache in zip(self.layers, caches):
            h = layer(h, rope, input_pos, mask, cache, slot)
        return self.norm(h)
