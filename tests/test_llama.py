"""The Llama blocks' cut attention: a step that reads only the cache positions it can see
(Transformer.forward's `seen`) computes what the whole window's attention computes."""

import pytest
import torch
import torch.nn.functional as F

from csm_streaming.model import llama
from csm_streaming.model.llama import KVCache, LlamaArgs, Transformer

# tiny widths, CSM-1B's 2048-position window: cuts below it are possible
ARGS = LlamaArgs(num_layers=2, num_heads=4, num_kv_heads=2, dim=64, intermediate_dim=128,
                 max_seq_len=2048)
POS = torch.tensor([[37], [600], [1300]])  # three rows (streams) at different positions


def model_and_caches(dtype):
    torch.manual_seed(0)
    model = Transformer(ARGS).to(dtype)
    caches = [KVCache(len(POS), ARGS, ARGS.max_seq_len, dtype, "cpu") for _ in model.layers]
    for c in caches:  # every position holds something: what lies past a row must be masked
        c.k.normal_()
        c.v.normal_()
    return model, caches


def keys_read(monkeypatch) -> list[int]:
    """The cache lengths the attention is given, call by call (one per layer)."""
    lengths, sdpa = [], F.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        lengths.append(k.shape[-2])
        return sdpa(q, k, v, **kwargs)
    monkeypatch.setattr(llama.F, "scaled_dot_product_attention", spy)
    return lengths


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_cut_attention_equals_the_whole_windows_alone_and_batched(dtype, monkeypatch):
    model, caches = model_and_caches(dtype)
    h = torch.randn(len(POS), 1, ARGS.dim, dtype=dtype)
    with torch.no_grad():
        whole = model(h, POS, caches)  # (writes the same rows at the same positions each call)
        lengths = keys_read(monkeypatch)
        batched = model(h, POS, caches, seen=int(POS.max()) + 1)
        alone = [(model(h[i:i + 1], POS[i:i + 1], caches, slot=i, seen=int(POS[i]) + 1),
                  model(h[i:i + 1], POS[i:i + 1], caches, slot=i)) for i in range(len(POS))]
    # whole blocks of the window: 1301 -> 1536 positions; 38 and 601 -> 512 and 1024
    assert lengths[:8] == [1536] * 2 + [512] * 2 + [2048] * 2 + [1024] * 2
    assert torch.equal(batched, whole)
    for i, (cut, uncut) in enumerate(alone):
        assert torch.equal(cut, uncut), f"row {i} cut at its position differs from the window"


def test_a_cut_never_reads_past_the_cache():
    model, caches = model_and_caches(torch.float32)
    h = torch.randn(len(POS), 1, ARGS.dim)
    with torch.no_grad():
        assert torch.equal(model(h, POS, caches, seen=ARGS.max_seq_len + 100),
                           model(h, POS, caches))
