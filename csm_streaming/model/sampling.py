"""Sampling: top-k with per-stream temperature and k, a counter-based random draw (no host
sync, no generator state), and the end-of-speech rule."""

from __future__ import annotations

from dataclasses import dataclass

import torch

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
    tokens = torch.arange(vocab, device=seed.device).expand(seed.shape[0], vocab)
    return noise_at(seed, counter, tokens)


def noise_at(seed: torch.Tensor, counter: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The noise of `exponential_noise` at token ids tokens [B, K] only (the top-k candidates)."""
    key = hash32(hash32(seed & _MASK32) ^ (counter & _MASK32))  # [B]
    bits = hash32(key[:, None] ^ hash32(tokens))
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


# Candidate counts of the top-k draw: the step sorts only the `candidates` largest logits, the
# smallest of these that holds every running stream's k (a full sort of 2051 logits per row is
# most of the sampler's time on a CPU: 0.66 ms per call at batch 8, 32 calls a frame).
SAMPLE_CANDIDATES = (64, 256)


def candidates_for(top_k: int) -> int | None:
    """The candidate count for a largest top-k (None: all logits)."""
    return next((c for c in SAMPLE_CANDIDATES if top_k <= c), None)


def sample_topk(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                seed: torch.Tensor, counter: torch.Tensor,
                candidates: int | None = None) -> torch.Tensor:
    """logits [B, V]; temperature [B] float; top_k [B] int64; seed, counter [B] -> [B] int64.

    Multinomial draw over the top-k of softmax(logits / T) with the exponential trick
    (argmax(p / q), q ~ Exp(1)): no host sync, no generator state. Ids Mimi cannot decode
    (>= 2048) are never drawn. p is taken unnormalised, exp(l - max l): the same number whether
    all V logits or only the `candidates` largest are looked at, so both give the same draw for
    every row whose k <= candidates (a row with a larger k draws from the candidates only).
    """
    logits = logits.float() / temperature[:, None]
    logits[:, MIMI_CODES:] = float("-inf")
    if candidates is None or candidates >= logits.shape[-1]:
        values = logits.sort(dim=-1, descending=True).values
        kth = values.gather(-1, top_k[:, None] - 1)
        tokens = None
    else:
        values, tokens = logits.topk(candidates, dim=-1)  # sorted, largest first
        kth = values.gather(-1, top_k.clamp(max=candidates)[:, None] - 1)
        logits = values
    weight = torch.exp(logits - values[:, :1]).masked_fill(logits < kth, 0.0)
    if tokens is None:
        q = exponential_noise(seed, counter, logits.shape[-1])
        return torch.argmax(weight / q, dim=-1)
    q = noise_at(seed, counter, tokens)
    return tokens.gather(-1, torch.argmax(weight / q, dim=-1, keepdim=True))[:, 0]


@dataclass
class SamplingState:
    """Per-stream sampling tensors [B]; fixed addresses so one captured step serves all."""

    temperature: torch.Tensor  # float32
    top_k: torch.Tensor  # int64
    seed: torch.Tensor  # int64 in [0, 2**32)
    frame: torch.Tensor  # int64, frames drawn so far (the counter of the random draw)
    candidates: int | None = None  # a host int >= every drawing row's k (candidates_for)

    def rows(self, n: int, candidates: int | None = None) -> SamplingState:
        """Views of the first n rows (in-place updates reach the full tensors)."""
        return SamplingState(self.temperature[:n], self.top_k[:n], self.seed[:n], self.frame[:n],
                             candidates)

    @classmethod
    def empty(cls, batch: int, device) -> SamplingState:
        return cls(torch.ones(batch, device=device),
                   torch.ones(batch, dtype=torch.long, device=device),
                   torch.zeros(batch, dtype=torch.long, device=device),
                   torch.zeros(batch, dtype=torch.long, device=device))
