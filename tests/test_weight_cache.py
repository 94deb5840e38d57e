"""Quantized weights kept on disk (model/weight_cache.py): a second load reads what the first
quantized, equal to it; a changed checkpoint or setting is never read stale; a damaged or
unwritable cache costs the start its speed, never its weights."""

import logging

import pytest
import torch

from conftest import make_hf_checkpoint
from csm_streaming.model import checkpoints, weight_cache
from csm_streaming.model import quantize as quantize_module
from csm_streaming.model.checkpoints import load_model_and_tokenizer
from csm_streaming.model.quantize import Int8Linear

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def rows_kept(monkeypatch):
    """The weight-only kernel keeps each int8 layer's rows, so two models' weights compare."""
    monkeypatch.setattr(quantize_module, "choose_cpu_kernel", lambda model: "int8pack")


def load(model="random:tiny", **kw):
    return load_model_and_tokenizer(model, CPU, torch.float32, "int8", **kw)[0]


def cached_folders(root):
    found = root / "quantized"
    return sorted(p for p in found.iterdir()) if found.is_dir() else []


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    la = [m.parts for m in a.modules() if isinstance(m, Int8Linear)]
    assert la and la == [m.parts for m in b.modules() if isinstance(m, Int8Linear)]


def never(what):
    def fail(*args, **kwargs):
        raise AssertionError(f"{what} ran where it should not")
    return fail


def test_a_second_random_load_reads_the_int8_weights_the_first_wrote(tmp_path, monkeypatch):
    root = tmp_path / "csm-cache"
    first = load()
    [folder] = cached_folders(root)
    assert (folder / weight_cache.MANIFEST).is_file()
    monkeypatch.setattr(checkpoints, "random_fill", never("drawing random weights"))
    real_init, quantized_on = quantize_module.Int8Linear.__init__, set()

    def watched_init(self, weight, parts=1):
        quantized_on.add(weight.device.type)
        real_init(self, weight, parts)

    monkeypatch.setattr(quantize_module.Int8Linear, "__init__", watched_init)
    second = load()
    assert quantized_on == {"meta"}  # only the layers' shapes: no value was quantized
    same_weights(first, second)
    assert not any(t.device.type == "meta" for t in [*second.parameters(), *second.buffers()])


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/maps"), reason="Linux only")
def test_the_cached_text_table_stays_mapped_from_its_file(tmp_path):
    """Kept in the cache or read from it, the int8 text table is its file mapped into memory (a
    prompt's lookups bring in only their rows), not a copy; the other tables are copies."""
    def mapped(name):
        [folder] = cached_folders(tmp_path / "csm-cache")
        return str(folder / f"{name}.safetensors") in open("/proc/self/maps").read()

    first = load()  # quantized, written, then mapped from the file written
    assert mapped("text_embeddings.weight") and not mapped("audio_embeddings.weight")
    plain = load(weight_cache=False)
    del first
    assert not mapped("text_embeddings.weight")  # the mapping goes with the model
    second = load()
    assert mapped("text_embeddings.weight") and not mapped("audio_embeddings.weight")
    tokens = torch.tensor([[3, 200, 17]])
    assert torch.equal(plain.text_embeddings(tokens), second.text_embeddings(tokens))


def test_cached_fbgemm_layers_multiply_as_the_quantized_ones(monkeypatch):
    if not quantize_module.fbgemm_available():
        pytest.skip("no FBGEMM here")
    monkeypatch.setattr(quantize_module, "choose_cpu_kernel", lambda model: "fbgemm")
    first, second = load(), load()  # the second from the cache; both keep packed weights only
    x = torch.randn(3, first.args.backbone.dim)
    pairs = [(a, b) for a, b in zip(first.modules(), second.modules())
             if isinstance(a, Int8Linear) and a.in_features == x.shape[1]]
    assert pairs and all(a.packed_only and b.packed_only for a, b in pairs)
    for a, b in pairs:
        assert torch.equal(a(x), b(x))


def test_a_checkpoint_is_read_once_and_a_changed_one_is_quantized_again(tmp_path, monkeypatch):
    folder = tmp_path / "ckpt"
    make_hf_checkpoint(folder, seed=0)
    first = load(str(folder))
    real_load_state = checkpoints.load_state
    monkeypatch.setattr(checkpoints, "load_state", never("reading the checkpoint"))
    again = load(str(folder))
    same_weights(first, again)
    monkeypatch.setattr(checkpoints, "load_state", real_load_state)
    make_hf_checkpoint(folder, seed=1)  # the same files, other weights
    changed = load(str(folder))
    fresh = load(str(folder), weight_cache=False)
    same_weights(changed, fresh)
    a, b = first.state_dict(), changed.state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)
    assert len(cached_folders(tmp_path / "csm-cache")) == 2


def test_a_quantizer_setting_is_part_of_the_key(tmp_path, monkeypatch):
    two_parts = load()
    monkeypatch.setattr(quantize_module, "TWO_PART_INT8", ())
    one_part = load()
    assert len(cached_folders(tmp_path / "csm-cache")) == 2
    def first_layer_parts(model):
        return {m.parts for m in model.backbone.layers[0].modules() if isinstance(m, Int8Linear)}
    assert first_layer_parts(two_parts) == {2} and first_layer_parts(one_part) == {1}


@pytest.mark.parametrize("damage", ["a layer's file gone", "a layer's file cut short",
                                    "manifest cut short"])
def test_a_damaged_cache_is_quantized_again_and_rewritten(tmp_path, caplog, damage):
    first = load()
    [folder] = cached_folders(tmp_path / "csm-cache")
    layer = folder / "backbone.layers.0.mlp.w2.weight.safetensors"
    if damage == "a layer's file gone":
        layer.unlink()
    elif damage == "a layer's file cut short":
        layer.write_bytes(layer.read_bytes()[:100])
    else:
        (folder / weight_cache.MANIFEST).write_text('{"args": ')
    with caplog.at_level(logging.WARNING, logger="csm.weight_cache"):
        again = load()
    assert "removing them" in caplog.text
    same_weights(first, again)
    assert layer.is_file() and [folder] == cached_folders(tmp_path / "csm-cache")
    same_weights(first, load())  # rewritten whole: read back


def test_a_failed_load_leaves_no_cache_behind(tmp_path, monkeypatch):
    real_fill = checkpoints.random_fill

    def failing(device, seed=0):
        fill = real_fill(device, seed)

        def each(name, p):
            if name.startswith("decoder."):
                raise RuntimeError("out of memory (pretend)")
            fill(name, p)
        return each

    monkeypatch.setattr(checkpoints, "random_fill", failing)
    with pytest.raises(RuntimeError, match="pretend"):
        load()
    root = tmp_path / "csm-cache"
    assert cached_folders(root) == []  # neither a folder nor its unfinished part


def test_an_unwritable_cache_loads_all_the_same(tmp_path, monkeypatch, caplog):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    monkeypatch.setenv("CSM_CACHE_DIR", str(blocked))
    with caplog.at_level(logging.WARNING, logger="csm.weight_cache"):
        model = load()
    assert "goes on without" in caplog.text
    same_weights(model, load(weight_cache=False))


def test_no_weight_cache_reads_and_writes_none(tmp_path, monkeypatch):
    import argparse

    from csm_streaming.options import add_model_arguments, load_arguments

    load(weight_cache=False)
    assert cached_folders(tmp_path / "csm-cache") == []
    first = load()
    monkeypatch.setattr(weight_cache.WeightCache, "read", never("reading the cache"))
    same_weights(first, load(weight_cache=False))
    p = argparse.ArgumentParser()
    add_model_arguments(p)
    assert load_arguments(p.parse_args(["--no-weight-cache"]))["weight_cache"] is False
    assert load_arguments(p.parse_args([]))["weight_cache"] is True


def test_model_shapes_survive_the_manifest():
    for args in checkpoints.FLAVORS.values():
        assert weight_cache.args_from_json(weight_cache.args_to_json(args)) == args
