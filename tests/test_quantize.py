"""Weight-only int8 / int4: the layers multiply by what they claim, the engine runs them, the
options refuse what cannot run. Speed and quality on full-size weights: bench_quantize.py."""

import pytest
import torch

from conftest import make_tiny_generator, on_gpu
from csm_streaming.engine.config import StreamingConfig
from csm_streaming.engine.frontend import StreamingGenerator
from csm_streaming.model import quantize as quantize_module
from csm_streaming.model.cpu_kernels import cpu_flags
from csm_streaming.model.embedding_tables import EMBEDDING_GROUP, Bf16Embedding, Int8Embedding
from csm_streaming.model.int4_layer import INT4_GROUP
from csm_streaming.model.quantize import (
    Int4Linear,
    Int8Linear,
    check_mode,
    quantize_model,
    weight_bytes,
)


def test_int8_weights_are_within_half_a_step_and_both_paths_agree():
    torch.manual_seed(0)
    w = torch.randn(96, 256) * 0.02
    w[3] *= 40  # one row far larger: per-row scales keep the others fine
    layer = Int8Linear(w)
    assert layer.weight_int8.dtype == torch.int8
    step = w.abs().amax(dim=1) / 127
    err = (layer.dequantized() - w).abs()
    assert (err <= step[:, None] / 2 + 1e-7).all()
    x = torch.randn(2, 5, 256)
    y = layer(x)
    assert y.shape == (2, 5, 96)
    ref = x @ layer.dequantized().T
    torch.testing.assert_close(y, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(layer.cast_mm(x), ref, atol=1e-4, rtol=1e-4)  # the CUDA form


def test_int8_embedding_values_are_within_half_their_groups_step(monkeypatch):
    """An int8 table: int8 values, a float32 scale per group of EMBEDDING_GROUP in a row; a
    row looked up is within half its group's step of the fp32 row, in the table's dtype, for
    any shape of indices (a frame's [B, 32], a prompt's [B, S, 1]). A quantized model keeps its
    text table so, its audio table in bf16."""
    torch.manual_seed(1)
    table = torch.nn.Embedding(300, 2 * EMBEDDING_GROUP)
    table.weight.data[7, :EMBEDDING_GROUP] *= 50  # a group far larger: the other keeps its step
    q = Int8Embedding(table, rows_at_once=128)  # slices that do not divide the rows
    w = table.weight.detach()
    step = w.abs().unflatten(1, (2, EMBEDDING_GROUP)).amax(dim=2) / 127  # [300, 2]
    err = (q.dequantized() - w).abs().unflatten(1, (2, EMBEDDING_GROUP))
    assert (err <= step[..., None] / 2 + 1e-7).all()
    assert err[7, 1].max() <= step[7, 1] / 2 + 1e-7 < step[7, 0] / 40
    for idx in (torch.tensor([[0, 7, 299]]), torch.randint(0, 300, (2, 5, 1))):
        out = q(idx)
        assert out.dtype == torch.float32 and out.shape == (*idx.shape, 2 * EMBEDDING_GROUP)
        assert torch.equal(out, q.dequantized()[idx])
    assert weight_bytes(q) == 300 * 2 * EMBEDDING_GROUP + 300 * 2 * 4  # int8 values, scales
    with pytest.raises(ValueError, match="groups of"):
        Int8Embedding(torch.nn.Embedding(4, EMBEDDING_GROUP + 1))
    from csm_streaming.model import checkpoints
    from csm_streaming.model.csm import FLAVORS

    monkeypatch.setattr(quantize_module, "choose_cpu_kernel", lambda model: "int8pack")
    model = checkpoints.build_model(FLAVORS["tiny"], None, torch.device("cpu"), torch.float32)
    (rows, dim), audio = model.text_embeddings.weight.shape, model.audio_embeddings.weight
    quantize_model(model, "int8")
    # the text table: a byte a value and a float32 scale a group, where fp32 took four a
    # value; the audio table (summed into every frame's input) in bf16
    assert isinstance(model.text_embeddings, Int8Embedding)
    assert weight_bytes(model.text_embeddings) == rows * (dim + 4 * dim // EMBEDDING_GROUP)
    assert isinstance(model.audio_embeddings, Bf16Embedding)
    assert torch.equal(model.audio_embeddings(torch.tensor([[1, 5]])),
                       audio[[1, 5]].bfloat16().float()[None])


def test_two_part_int8_weights_keep_16_bits_and_every_kernel_adds_the_parts():
    torch.manual_seed(4)
    w = torch.randn(48, 128) * 0.02
    one, two = Int8Linear(w), Int8Linear(w, parts=2)
    assert two.weight_int8.shape == (96, 128) and two.scale.shape == (96,)
    err_one = (one.dequantized() - w).abs().max()
    err_two = (two.dequantized() - w).abs().max()
    assert err_two <= err_one / 200  # the second part stores the first's rounding at 1/254
    x = torch.randn(3, 128)
    ref = x @ two.dequantized().T
    torch.testing.assert_close(two(x), ref, atol=1e-5, rtol=1e-5)  # int8pack, then the sum
    torch.testing.assert_close(two.cast_mm(x).view(3, 2, 48).sum(1), ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="parts must be 1 or 2"):
        Int8Linear(w, parts=3)


def test_activation_parts_are_integers_each_stream_on_its_own_power_of_two_step():
    from csm_streaming.model.int8_split import activation_parts, grid_ends

    torch.manual_seed(5)
    streams = torch.randn(3, 2, 64) * 3  # 3 streams of 2 rows
    streams[1] *= 50  # a loud one: the others keep their own steps
    for narrow, low, high in ((False, -128, 127), (True, -64, 63)):
        ends, top = grid_ends(narrow)
        parts, steps, gain = activation_parts(streams.clone(), ends, top)
        assert top == high and gain == 2 * high and parts.shape == (12, 64 + 2)
        assert steps.shape == (3, 1, 1)
        for s, step in zip(streams, steps.flatten().tolist()):
            assert step == 2.0 ** round(torch.log2(torch.tensor(step)).item())  # a power of 2
            assert step / 2 < s.abs().max() / high <= step  # the finest that holds the stream
        assert (parts[:, 64] == low).all() and (parts[:, 65] == high).all()  # the grid's ends
        assert torch.equal(parts, parts.round()) and parts.min() >= low and parts.max() <= high
        q, err = parts[:, :64].view(3, 4, 64).split(2, dim=1)
        rebuilt = (q + err / gain) * steps
        assert ((rebuilt - streams).abs() <= steps / gain).all()  # ~2 x 8 bits, per stream
    zeros, steps, _ = activation_parts(torch.zeros(1, 1, 64), *grid_ends(False))
    assert torch.equal(zeros[:, :64], torch.zeros(2, 64))  # silence stays exact


def int8_kernel(name: str):
    """The pytest param of an int8 x int8 CPU kernel, skipped where this torch lacks it."""
    from csm_streaming.model.quantize import fbgemm_available, onednn_int8_available

    there = fbgemm_available() if name == "fbgemm" else onednn_int8_available()
    return pytest.param(name, marks=pytest.mark.skipif(not there, reason=f"no {name} here"),
                        id=name)


@pytest.mark.parametrize("kernel", [int8_kernel("fbgemm"), int8_kernel("onednn")])
@pytest.mark.parametrize("parts", [1, 2])
def test_int8_products_multiply_by_the_same_weights_and_keep_streams_apart(parts, kernel):
    torch.manual_seed(3)
    layer = Int8Linear(torch.randn(96, 256) * 0.02, parts=parts)
    layer.use_cpu_kernel(kernel)
    x = torch.randn(3, 2, 256)  # 3 streams of 2 positions, as the depth decoder's first step
    x[1] *= 50  # a loud neighbour must not coarsen the others' activation steps
    y = layer(x)
    ref = x @ layer.dequantized().T
    # the activations go in as two 8-bit parts: ~1e-4 of the output's size (one part: 1-2%)
    for b in range(3):
        assert (y[b] - ref[b]).norm() / ref[b].norm() < 1e-3
        assert torch.equal(y[b:b + 1], layer(x[b:b + 1]))  # alone, the same bits
    rows = torch.randn(4, 256)  # [streams, features]: each row is a stream
    assert torch.equal(layer(rows)[2], layer(rows[2:3])[0])


@pytest.mark.skipif(not (quantize_module.fbgemm_available()
                         and quantize_module.onednn_int8_available()),
                    reason="needs both FBGEMM and oneDNN")
def test_both_int8_kernels_sum_the_same_integers():
    """FBGEMM and oneDNN take the same integer activations (one by its range, one by the zero
    point given) and sum in int32: the same numbers, up to float rounding after the sums."""
    torch.manual_seed(6)
    layer = Int8Linear(torch.randn(64, 512) * 0.02, parts=2)
    x = torch.randn(2, 3, 512)
    out = {}
    for kernel in ("fbgemm", "onednn"):
        layer.use_cpu_kernel(kernel)
        out[kernel] = layer(x)
    torch.testing.assert_close(out["fbgemm"], out["onednn"], atol=1e-6, rtol=1e-6)


AVX2_INT8 = """
import sys
import torch
from csm_streaming.model import quantize
assert quantize.VNNI is False, "a cap at AVX2 must count as a CPU without VNNI"
torch.manual_seed(0)
layer = quantize.Int8Linear(torch.randn(256, 1024))
x = torch.randn(4, 1024) * 3
ref = x @ layer.dequantized().T
for vnni in (False, True):
    quantize.VNNI = vnni
    for kernel in sys.argv[1:]:
        y = getattr(layer, kernel + "_mm")(x)
        print(kernel, vnni, ((y - ref).abs().max() / ref.abs().max()).item())
"""


@pytest.mark.skipif("avx2" not in cpu_flags(), reason="needs an x86 CPU")
@pytest.mark.parametrize("cap", ["ONEDNN_MAX_CPU_ISA", "FBGEMM_ENABLE_INSTRUCTIONS"])
def test_int8_kernels_capped_at_avx2_get_7_bit_activations_that_cannot_saturate(cap):
    """A CPU without VNNI sums pairs of 8-bit products in saturating int16 (AVX2): 8-bit
    activations overflow there, 7-bit ones cannot. oneDNN and FBGEMM capped at AVX2 (in a new
    process: they read the cap when they load) run those kernels on any x86 CPU, so both are
    seen here; either cap makes cpu_has_vnni say no."""
    import os
    import subprocess
    import sys

    kernels = [k for k, there in (("onednn", quantize_module.onednn_int8_available()),
                                  ("fbgemm", quantize_module.fbgemm_available())) if there]
    if not kernels:
        pytest.skip("no int8 x int8 kernel here")
    env = {k: v for k, v in os.environ.items() if k not in quantize_module.NO_VNNI_CAPS}
    env[cap] = "AVX2"  # this library capped, the other not
    out = subprocess.run([sys.executable, "-c", AVX2_INT8, *kernels], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    errors = {(k, v): float(e) for k, v, e in map(str.split, out.stdout.splitlines())}
    assert len(errors) == 2 * len(kernels)
    for kernel in kernels:
        assert errors[kernel, "False"] < 1e-3  # 7 bits, as cpu_has_vnni chose: exact sums
    capped = "onednn" if cap == "ONEDNN_MAX_CPU_ISA" else "fbgemm"
    if capped in kernels:
        assert errors[capped, "True"] > 1e-2  # 8 bits there: saturated


def test_int4_weights_are_within_half_a_step_of_their_group():
    torch.manual_seed(1)
    w = torch.randn(64, 256) * 0.02
    layer = Int4Linear(w)
    assert layer.group == INT4_GROUP == 32  # GGUF's Q4 block
    g = w.view(64, 8, 32)
    step = (g.amax(-1) - g.amin(-1)) / 15  # [64, 8]
    err = (layer.dequantized() - w).abs().view(64, 8, 32)
    # half a step, plus bfloat16's rounding of the scale and zero (8 bits of mantissa)
    assert (err <= step[..., None] * (0.5 + 8 / 256) + 1e-6).all()
    x = torch.randn(3, 256)
    y = layer(x)
    assert y.shape == (3, 64) and y.dtype == torch.float32
    torch.testing.assert_close(y, x @ layer.dequantized().T, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("mode", ["int8", "int4", int8_kernel("onednn"), int8_kernel("fbgemm")])
def test_compiled_quantized_layer_equals_eager(mode):
    """A layer compiled as the engine compiles (on a CPU: frozen weights, which oneDNN's int8
    product needs, its packed weight a constant of the graph; FBGEMM's product an operator
    that finds its packed weights by the layer's number) computes what it does eagerly, to
    the layer's own precision: int4 to bf16's (inside the layer the activations are bf16, and
    compiled, inductor may choose its own int4 kernel, which sums in another order); the int8
    x int8 kernels to their ~16-bit activations (compiled, the activations' split may round a
    rare value the other way), both within 1e-3 of the dequantized product."""
    from csm_streaming.engine.graphs import compile_module

    torch.manual_seed(2)
    layer = (Int4Linear if mode == "int4" else Int8Linear)(torch.randn(64, 128) * 0.02)
    if mode in ("onednn", "fbgemm"):
        layer.use_cpu_kernel(mode)
        layer.prepare_for_graphs()
    x = torch.randn(4, 128)
    tol = {"int4": 1e-2, "onednn": 1e-4, "fbgemm": 1e-4}.get(mode, 1e-5)
    with torch.no_grad():
        got, eager = compile_module(layer, torch.device("cpu"))(x), layer(x)
    torch.testing.assert_close(got, eager, atol=tol, rtol=tol)
    if mode in ("onednn", "fbgemm"):
        ref = x @ layer.dequantized().T
        assert (got - ref).norm() / ref.norm() < 1e-3 and (eager - ref).norm() / ref.norm() < 1e-3


@pytest.mark.parametrize("mode, kernel, device", [
    ("int8", "int8pack", "cpu"), ("int8", int8_kernel("fbgemm"), "cpu"),
    ("int8", int8_kernel("onednn"), "cpu"), ("int4", None, "cpu"),
    pytest.param("int8", None, "cuda", marks=on_gpu("cuda")),  # the cast-in-the-product form
    pytest.param("int8", None, "mps", marks=on_gpu("mps"))])
def test_a_quantized_model_streams_what_it_generates(mimi, mode, kernel, device, monkeypatch):
    from csm_streaming.model import quantize

    if kernel is not None:  # whichever the timing would pick, this one
        monkeypatch.setattr(quantize, "choose_cpu_kernel", lambda model: kernel)
    gen = make_tiny_generator(mimi, device)
    model = gen.model
    full = weight_bytes(model)
    assert quantize_model(model, mode) > 0
    for name, m in model.named_modules():  # the chosen kernel; 2 parts: the backbone's first 8
        if isinstance(m, Int8Linear):  # layers (both of random:tiny's) and the audio heads
            assert m.parts == (2 if name.startswith(("backbone.layers.", "audio_heads_int8."))
                               else 1)
            assert kernel is None or m.cpu_kernel == kernel
    # the 31 audio heads too, the fp32 tensor dropped (int4 mode: in int8, as what int4's
    # packing cannot take)
    assert len(model.audio_heads_int8) == 31 and model.audio_head.numel() == 0
    if mode == "int4":
        assert any(isinstance(m, Int4Linear) for m in model.modules())
    quantized = sum(isinstance(m, (Int8Linear, Int4Linear)) for m in model.modules())
    assert not any(isinstance(m, torch.nn.Linear) and m is not model.codebook0_head
                   for m in model.modules())
    assert weight_bytes(model) < full
    ref = gen.generate("Quantized.", 0, max_audio_length_ms=640, topk=1, seed=5)
    sg = StreamingGenerator(gen, StreamingConfig(enable_compilation=False))
    out = torch.cat(list(sg.generate_streaming("Quantized.", 0, max_audio_length_ms=640, topk=1,
                                               seed=5)))
    # The kernel for what stays fp32 (codebook0_head) is chosen by timing; whichever it is, the
    # quantized layers stay quantized and the output is the reference's.
    assert sg.engine.cpu_kernel in ("plain", "onednn", "mkl")
    assert sum(isinstance(m, (Int8Linear, Int4Linear)) for m in model.modules()) == quantized
    assert out.shape == ref.shape == (8 * 1920,)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)


def test_weight_only_int8_is_not_compiled_and_says_why(mimi, caplog, monkeypatch):
    """--compile where the CPU has no int8 x int8 product (the weight-only kernel) runs eager,
    with a warning; the CPU's kernel choice still runs."""
    import logging

    monkeypatch.setattr(quantize_module, "choose_cpu_kernel", lambda model: "int8pack")
    gen = make_tiny_generator(mimi)
    quantize_model(gen.model, "int8")
    with caplog.at_level(logging.WARNING, logger="csm"):
        sg = StreamingGenerator(gen, StreamingConfig(enable_compilation=True))
    assert sg.engine.compiled is None
    assert sg.engine.cpu_kernel in ("plain", "onednn", "mkl")
    assert any("not used for int8 weights on this CPU: its int8 kernel (int8pack)" in
               r.getMessage() for r in caplog.records)


def test_a_copied_fbgemm_layer_multiplies_by_its_own_packed_weights():
    """Compiled graphs find FBGEMM's packed weights by the layer's number: a copy (a model
    deep-copied, pickled) packs again under a number of its own, never the original's."""
    import copy

    if not quantize_module.fbgemm_available():
        pytest.skip("FBGEMM is x86 only")
    layer = Int8Linear(torch.randn(32, 64))
    layer.use_cpu_kernel("fbgemm")
    layer.prepare_for_graphs()
    twin = copy.deepcopy(layer)
    twin.weight_int8.neg_()  # another layer now: its own weights
    twin.prepare_for_graphs()
    x = torch.randn(2, 64)
    torch.testing.assert_close(twin(x), -layer(x), atol=1e-5, rtol=1e-5)
    assert twin.number != layer.number
    assert quantize_module.FBGEMM_LAYERS[twin.number] is twin
    assert quantize_module.FBGEMM_LAYERS[layer.number] is layer


@pytest.mark.parametrize("kernel", [int8_kernel("onednn"), int8_kernel("fbgemm")])
def test_int8_with_onednn_or_fbgemm_compiles_and_streams_what_eager_does(mimi, monkeypatch,
                                                                          kernel):
    """With an int8 x int8 product --compile takes the backbone and the depth decoder (oneDNN:
    its packed weights constants of the graphs, frozen in; FBGEMM: an operator the graphs call,
    nothing frozen, so AOTAutograd's cache can serve the next start), the activations' split
    fused around each product, and the stream is the eager stream's."""
    import torch._dynamo

    from csm_streaming.engine.graphs import CPU_COMPILE_OPTIONS, cpu_compile_options

    monkeypatch.setattr(quantize_module, "choose_cpu_kernel", lambda model: kernel)
    gen = make_tiny_generator(mimi)
    assert cpu_compile_options(gen.model) is CPU_COMPILE_OPTIONS  # fp32: tuned, frozen
    quantize_model(gen.model, "int8")
    options = cpu_compile_options(gen.model)
    assert options == {**CPU_COMPILE_OPTIONS, "freezing": kernel == "onednn"}
    torch._dynamo.reset()
    compiled = StreamingGenerator(gen, StreamingConfig(enable_compilation=True))
    assert compiled.engine.compiled is not None
    eager = StreamingGenerator(gen, StreamingConfig(enable_compilation=False))
    got, ref = (torch.cat(list(g.generate_streaming("Compiled int8.", 0, max_audio_length_ms=480,
                                                    topk=1, seed=4))) for g in (compiled, eager))
    assert got.shape == ref.shape == (6 * 1920,)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


def test_modes_that_cannot_run_are_refused_with_what_can():
    check_mode(None, "cuda")
    check_mode("int8", "cuda")
    check_mode("int4", "cpu")
    check_mode("int4", "auto")  # decided once the device is known
    with pytest.raises(ValueError, match="int4 weights run on the CPU only.*int8"):
        check_mode("int4", "cuda")
    with pytest.raises(ValueError, match="one of int8, int4"):
        check_mode("int3", "cpu")


def test_int8_keeps_two_parts_for_the_backbones_first_eight_layers_only(monkeypatch):
    """Two-part weights cost twice the bytes: they go where one part's rounding costs the most
    (the backbone's first layers, whose error every later layer inherits; bench_quantize.py),
    and the audio heads; the later backbone layers and the depth decoder keep one part."""
    import dataclasses

    from csm_streaming.model.csm import CSM, FLAVORS

    tiny = FLAVORS["tiny"]
    model = CSM(dataclasses.replace(tiny, backbone=dataclasses.replace(tiny.backbone,
                                                                       num_layers=10)))
    monkeypatch.setattr(quantize_module, "choose_cpu_kernel", lambda model: "int8pack")
    quantize_model(model, "int8")
    for i, layer in enumerate(model.backbone.layers):
        for m in (layer.attn.qkv_proj, layer.attn.output_proj, layer.mlp.w13, layer.mlp.w2):
            assert m.parts == (2 if i < 8 else 1), (i, m)
    assert {m.parts for m in model.decoder.modules() if isinstance(m, Int8Linear)} == {1}
    assert model.projection.parts == 1 and model.codebook0_head.parts == 1
    assert {m.parts for m in model.audio_heads_int8} == {2}


def test_the_loader_takes_quantize_or_a_dtype_name():
    from csm_streaming.engine.loader import load_csm_1b

    gen = load_csm_1b(device="cpu", model="random:tiny", dtype="int8", watermark=False)
    assert any(isinstance(m, Int8Linear) for m in gen.model.modules())
    with pytest.raises(ValueError, match="a torch.dtype, or one of fp32, bf16, auto, int8, int4"):
        load_csm_1b(device="cpu", model="random:tiny", dtype="fp16", watermark=False)


def test_dtype_auto_loads_what_it_measured_faster_and_says_why(caplog):
    import logging

    from csm_streaming.engine.frontend import StreamingGenerator
    from csm_streaming.engine.loader import load_csm_1b

    with caplog.at_level(logging.INFO, logger="csm"):
        gen = load_csm_1b(device="cpu", model="random:tiny", dtype="auto", watermark=False)
    dtype = next(gen.model.parameters()).dtype
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("dtype auto: ")]
    # the pick is the machine's; what it guarantees: the model is in the dtype it names, both
    # were measured, and the model speaks in it (stream == plain loop)
    assert len(said) == 1 and said[0].startswith(
        f"dtype auto: {'bf16' if dtype == torch.bfloat16 else 'fp32'} on this CPU")
    assert "fp32 " in said[0] and "bf16 " in said[0]
    ref = gen.generate("Auto.", 0, max_audio_length_ms=320, topk=1, seed=2)
    out = torch.cat(list(StreamingGenerator(gen).generate_streaming(
        "Auto.", 0, max_audio_length_ms=320, topk=1, seed=2)))
    assert out.shape == ref.shape == (4 * 1920,)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
    named = load_csm_1b(device="cpu", model="random:tiny", dtype="bf16", watermark=False)
    assert next(named.model.parameters()).dtype == torch.bfloat16


def test_dtype_auto_weighs_int8_when_asked_and_keeps_what_it_says(caplog):
    import logging

    from csm_streaming.engine.loader import load_csm_1b

    with caplog.at_level(logging.INFO, logger="csm"):
        gen = load_csm_1b(device="cpu", model="random:tiny", dtype="auto", quantize="int8",
                          watermark=False)
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("dtype auto: ")]
    assert len(said) == 1 and all(f"{k} " in said[0] for k in ("fp32", "bf16", "int8"))
    # every int8 kernel is weighed: oneDNN's is far slower than FBGEMM's on CPUs without VNNI
    assert all(f"int8 ({k}) " in said[0] for k in quantize_module.int8_cpu_kernels())
    picked = said[0].removeprefix("dtype auto: ").split()[0].rstrip(";")
    quantized = any(isinstance(m, Int8Linear) for m in gen.model.modules())
    # the pick is the machine's; what it guarantees: the model is what the message names
    assert quantized == (picked == "int8")
    assert next(gen.model.parameters()).dtype == (torch.bfloat16 if picked == "bf16"
                                                  else torch.float32)
    if not quantized:
        assert "int8 was asked for but is slower here" in said[0]



def same_quantized_weights(a: torch.nn.Module, b: torch.nn.Module):
    """Both models hold the same quantized layers with the same stored weights, and the same
    other parameters."""
    la = {n: m for n, m in a.named_modules() if isinstance(m, (Int8Linear, Int4Linear))}
    lb = {n: m for n, m in b.named_modules() if isinstance(m, (Int8Linear, Int4Linear))}
    assert la.keys() == lb.keys() and la
    for name, m in la.items():
        assert type(m) is type(lb[name]), name
        for key, t in m.state_dict().items():
            assert torch.equal(t, lb[name].state_dict()[key]), f"{name}.{key}"
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_a_quantized_model_is_quantized_as_its_weights_are_written(mode, monkeypatch):
    """build_model(quantize=...) writes its parameters and quantizes each Linear at once: two
    workers building at a time, before any write at most one Linear written earlier (the other
    worker's) is still full precision (so the full-precision model never exists: the peak
    memory is the quantized model and a layer per worker), and the result is what building
    the full model and quantizing it gives, random and from a checkpoint, whose extra or
    missing tensors are refused."""
    from csm_streaming.model import checkpoints
    from csm_streaming.model.csm import FLAVORS

    monkeypatch.setattr(quantize_module, "choose_cpu_kernel", lambda model: "int8pack")
    args, cpu = FLAVORS["tiny"], torch.device("cpu")
    plain = checkpoints.build_model(args, None, cpu, torch.float32)
    state = {k: v.clone() for k, v in plain.state_dict().items()}  # the checkpoint's names
    parameters = len(list(plain.parameters()))
    quantize_model(plain, mode)
    from csm_streaming.model import quantized_load

    real_build, still_full = quantized_load.build_quantized, []
    monkeypatch.setattr(quantized_load, "build_workers", lambda: 2)

    def watched_build(model, fill, mode, cache=None):
        written = set()
        linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]

        def each(name, p):  # before each write: the Linears written earlier and not quantized
            still_full.append([n for n in linears if f"{n}.weight" in written
                               and isinstance(model.get_submodule(n), torch.nn.Linear)])
            fill(name, p)
            written.add(name)
        return real_build(model, each, mode, cache)

    monkeypatch.setattr(quantized_load, "build_quantized", watched_build)
    built = checkpoints.build_model(args, None, cpu, torch.float32, quantize=mode)
    assert len(still_full) == parameters and max(map(len, still_full)) <= 1
    same_quantized_weights(built, plain)
    loaded = checkpoints.build_model(args, dict(state), cpu, torch.float32, quantize=mode)
    same_quantized_weights(loaded, plain)
    with pytest.raises(ValueError, match="unexpected"):
        checkpoints.build_model(args, {**state, "extra.weight": torch.zeros(1)}, cpu,
                                torch.float32, quantize=mode)
    with pytest.raises(ValueError, match="missing"):
        checkpoints.build_model(args, {k: v for k, v in state.items() if "decoder" not in k},
                                cpu, torch.float32, quantize=mode)


@pytest.mark.skipif(not quantize_module.onednn_int8_available(), reason="no oneDNN int8 here")
def test_a_loaded_int8_model_keeps_only_its_packed_weights(monkeypatch):
    """Loaded with --quantize, an int8 layer whose kernel packs its weights (oneDNN, FBGEMM)
    drops the plain int8 rows beside the packed copy: the same products with half the memory;
    what would need the rows (a copy, dequantized) says why it cannot."""
    import copy

    from csm_streaming.model import checkpoints
    from csm_streaming.model.csm import FLAVORS

    monkeypatch.setattr(quantize_module, "choose_cpu_kernel", lambda model: "onednn")
    args, cpu = FLAVORS["tiny"], torch.device("cpu")
    built = checkpoints.build_model(args, None, cpu, torch.float32, quantize="int8")
    plain = checkpoints.build_model(args, None, cpu, torch.float32)
    quantize_model(plain, "int8")
    kept = dict(plain.named_modules())
    layers = [(n, m) for n, m in built.named_modules() if isinstance(m, Int8Linear)]
    assert layers and all(m.packed_only and m.weight_int8.numel() == 0 for _, m in layers)
    assert all(kept[n].weight_int8.numel() > 0 for n, _ in layers)
    x = torch.randn(3, 1, args.backbone.dim)
    name, layer = next((n, m) for n, m in layers if m.in_features == args.backbone.dim)
    assert torch.equal(layer(x), kept[name](x))
    assert weight_bytes(built) == weight_bytes(plain)  # the bytes a frame reads: the same
    with pytest.raises(RuntimeError, match="keeps only the weights packed for onednn"):
        copy.deepcopy(built)
    with pytest.raises(RuntimeError, match="quantize_model instead"):
        layer.dequantized()


def test_csm_int8_kernel_names_the_kernel_without_timing(monkeypatch):
    """CSM_INT8_KERNEL pins the int8 kernel (the timing between two close kernels can flip
    run to run); a kernel this CPU lacks is refused with the ones it has."""
    from csm_streaming.model import checkpoints
    from csm_streaming.model.csm import FLAVORS

    def timed(model):
        raise AssertionError("timed although CSM_INT8_KERNEL named the kernel")

    monkeypatch.setattr(quantize_module, "choose_cpu_kernel", timed)
    monkeypatch.setenv("CSM_INT8_KERNEL", "int8pack")
    model = checkpoints.build_model(FLAVORS["tiny"], None, torch.device("cpu"), torch.float32,
                                    quantize="int8")
    assert {m.cpu_kernel for m in model.modules() if isinstance(m, Int8Linear)} == {"int8pack"}
    monkeypatch.setenv("CSM_INT8_KERNEL", "tpu")
    with pytest.raises(ValueError, match="CSM_INT8_KERNEL=tpu: this CPU's int8 kernels are"):
        checkpoints.build_model(FLAVORS["tiny"], None, torch.device("cpu"), torch.float32,
                                quantize="int8")
