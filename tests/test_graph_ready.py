"""What a CUDA graph and torch.compile need from the frame step, proven on a CPU.

- No host sync inside the frame step: every op that reads a tensor's value on the host (.item(),
  .tolist(), nonzero, bool(tensor), a copy to the CPU...) is recorded while the engine runs
  streams that join and end, in batch buckets 1 and 4, at top-k 1 and 50: none happens inside a
  step, and between a chunk's first step and its decode the one look is `valid.tolist()` in
  `_chunk`.
- Graph-ready: dynamo traces each bucket's frame step whole (fullgraph, no break), and 20 steps
  with moving positions, other temperatures and top-k and slots that change hands compile it
  once. Every buffer a captured graph would hold keeps its storage across steps and resets.
"""

import inspect
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from csm_streaming.engine.config import StreamingConfig
from csm_streaming.engine.frontend import StreamingGenerator
from csm_streaming.engine.graphs import CPU_COMPILE_OPTIONS
from csm_streaming.request import GenerationRequest, SamplingParams

aten = torch.ops.aten
# Ops that need a tensor's value on the host (a device would have to finish first)
SYNC_OPS = {aten._local_scalar_dense.default, aten.item.default, aten.is_nonzero.default,
            aten.nonzero.default, aten.masked_select.default, aten._unique2.default,
            aten.unique_consecutive.default, aten.repeat_interleave.Tensor}
SYNC_METHODS = ("item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__",
                "__index__")
PACKAGE = str(Path(__file__).resolve().parent.parent / "csm_streaming")


def where() -> str:
    """The package function that asked (the innermost frame in csm_streaming)."""
    for frame in inspect.stack()[2:]:
        if frame.filename.startswith(PACKAGE):
            return frame.function
    return "?"


class SyncRecorder(TorchDispatchMode):
    """Records host reads as (what, where) while `on`."""

    def __init__(self, monkeypatch):
        super().__init__()
        self.on, self.events = False, []
        for name in SYNC_METHODS:
            original = getattr(torch.Tensor, name)

            def wrapped(t, *a, _name=name, _original=original, **k):
                self._record(f".{_name}()")
                return _original(t, *a, **k)

            monkeypatch.setattr(torch.Tensor, name, wrapped)

    def _record(self, what: str):
        if self.on:
            self.events.append((what, where()))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        bool_index = func is aten.index.Tensor and any(
            i is not None and i.dtype == torch.bool for i in args[1])
        to_host = func is aten._to_copy.default and kwargs.get("device") == torch.device("cpu")
        if func in SYNC_OPS or bool_index or to_host:
            self._record(str(func))
        return func(*args, **kwargs)


def test_the_recorder_sees_each_kind_of_host_read(monkeypatch):
    # the detector itself can fail: each of these is a host read it must see
    rec = SyncRecorder(monkeypatch)
    x = torch.arange(4)
    with rec:
        rec.on = True
        x.sum().item(), x.tolist(), x[x > 1], bool(x[0]), x.nonzero(), int(x[1])
        x.to("cpu", copy=True)
    seen = " ".join(w for w, _ in rec.events)
    for what in (".item()", ".tolist()", "aten.index", ".__bool__()", "aten.nonzero",
                 ".__int__()", "aten._to_copy"):
        assert what in seen, (what, seen)


def test_no_host_sync_inside_the_frame_step(own_generator, monkeypatch):
    sg = StreamingGenerator(own_generator, StreamingConfig(max_batch_size=4))
    engine = sg.engine
    rec = SyncRecorder(monkeypatch)
    inside, before_decode, steps, buckets = [], [], [0], set()
    frame_step, decode, chunk = engine._frame_step, engine._decode, engine._chunk

    def traced_step(n, *rest):
        buckets.add(n)
        steps[0] += 1
        mark = len(rec.events)
        out = frame_step(n, *rest)
        inside.extend(rec.events[mark:])
        return out

    def traced_chunk(streams):
        rec.on, mark = True, len(rec.events)
        try:
            return chunk(streams)
        finally:
            rec.on = False
            before_decode.append(rec.events[mark:])

    def traced_decode(*a):
        rec.on = False  # after the frames: Mimi and the host copies of the chunk
        return decode(*a)

    monkeypatch.setattr(engine, "_frame_step", traced_step)
    monkeypatch.setattr(engine, "_chunk", traced_chunk)
    monkeypatch.setattr(engine, "_decode", traced_decode)
    engine._steps.clear()  # the graphed wrappers call the traced step
    reqs = [GenerationRequest("First one.", 0, (), SamplingParams(0.9, 1, 1, 1600)),
            GenerationRequest("The second, longer.", 1, (), SamplingParams(0.7, 50, 2, 2400)),
            GenerationRequest("Third.", 0, (), SamplingParams(1.2, 50, 3, 1200))]
    streams = [engine.submit(reqs[0])]
    with rec, torch.inference_mode():
        for i in range(200):
            engine.step()
            if i == 2:  # others join while the first runs: bucket 1 -> 4
                streams += [engine.submit(reqs[1]), engine.submit(reqs[2])]
            if i == 12:
                engine.cancel(streams[1])  # one leaves mid-stream
            if not engine.active and not engine.prompts.pending:
                break
    assert not engine.active and steps[0] > 10 and {1, 4} <= buckets
    # on a CPU (no sync there) the step reads how far its running streams' positions go, to
    # cut the attention (StreamEngine._positions_seen); on a GPU that reads nothing (below)
    allowed = {"_positions_seen"} if engine.device.type == "cpu" else set()
    inside = [e for e in inside if e[1] not in allowed]
    assert inside == [], f"host reads inside the frame step: {sorted(set(inside))}"
    before_decode = [[e for e in events if e[1] not in allowed] for events in before_decode]
    assert before_decode and all(e == [(".tolist()", "_run_frames")] for e in before_decode), \
        before_decode


def test_the_attention_cut_reads_positions_on_a_cpu_only(own_generator, monkeypatch):
    sg = StreamingGenerator(own_generator, StreamingConfig(max_batch_size=2))
    engine = sg.engine
    stream = engine.submit(GenerationRequest("Cut.", 0, (), SamplingParams(0.9, 50, 1, 800)))
    while stream.state != "running":
        engine.step()
    pos = engine.state.pos[:1]
    rec = SyncRecorder(monkeypatch)
    with rec, torch.inference_mode():
        rec.on = True
        assert engine._positions_seen(pos) == int(pos[0]) + 1 and rec.events  # a CPU reads
        rec.events.clear()
        monkeypatch.setattr(engine, "device", torch.device("cuda"))  # as on a GPU
        assert engine._positions_seen(pos) is None and rec.events == []


# -- graph-ready: one trace per bucket, no recompile, fixed storage -------------------------------


def buffers(engine) -> dict[str, int]:
    """The storage every captured graph of the step holds, by name."""
    st, found = engine.state, {}
    for name in ("last_h", "pos", "ended", "valid", "codes"):
        found[name] = getattr(st, name).data_ptr()
    for name, t in vars(st.sampling).items():
        if isinstance(t, torch.Tensor):
            found[f"sampling.{name}"] = t.data_ptr()
    for kind in ("backbone", "decoder"):
        for i, c in enumerate(getattr(engine.caches, kind)):
            found[f"{kind}[{i}].k"], found[f"{kind}[{i}].v"] = c.k.data_ptr(), c.v.data_ptr()
    return found


@pytest.mark.parametrize("bucket", [1, 4])  # one stream, and four in one step
def test_the_frame_step_traces_whole_once_and_keeps_its_buffers(own_generator, bucket):
    import torch._dynamo

    sg = StreamingGenerator(own_generator, StreamingConfig(max_batch_size=4))
    engine = sg.engine
    reqs = [GenerationRequest(f"Stream number {i}.", i % 2, (), SamplingParams(
        0.6 + 0.2 * i, [1, 50, 7, 2051][i], i, 4000)) for i in range(4)]
    for r in reqs[:bucket]:
        engine.submit(r)
    with torch.inference_mode():
        engine.prepare_all()  # prefill: the streams run from here
    before = buffers(engine)
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    step = torch.compile(lambda: engine._frame_step(bucket), backend=counting_backend,
                         fullgraph=True)  # fullgraph: a graph break is an error
    with torch.inference_mode():
        for i in range(20):
            step()
            if i == 5:  # new sampling settings in place, as a joining stream writes them
                engine.state.sampling.temperature[:bucket].mul_(0.5)
                engine.state.sampling.top_k[:bucket].copy_(
                    torch.tensor([3, 2051, 1, 40][:bucket]))
            if i == 10:  # a slot changes hands: reset its row as admission does
                engine.cancel(engine.active[0])
                engine.submit(reqs[0])
                engine.prepare_all()
    assert len(graphs) == 1, f"{len(graphs)} compilations for bucket {bucket}"
    assert buffers(engine) == before  # same storage: a captured graph stays valid
    assert int(engine.state.pos[:bucket].min()) > 0


def test_compile_is_bounded_four_small_graphs_per_bucket_and_none_fall_back(own_generator,
                                                                            monkeypatch):
    """torch.compile takes the step's parts, not the whole step: per batch bucket one backbone
    graph, two depth graphs (the projection and the depth decoder: 2 positions, then 1) and one
    sampler graph, each the size of one part's call (the whole step traced as one graph unrolls
    the 31 depth steps: ~8400 nodes on random:tiny, which inductor did not compile in 13
    minutes on 2 cores). With dynamo's default limit of 8 graphs per function (more buckets or
    candidate counts pass it) none may fall back to eager."""
    import torch._dynamo
    import torch._inductor.config as inductor_config

    sizes, settings = [], []  # each graph's size, and inductor's settings as it compiles

    def counting_backend(gm, example_inputs):
        sizes.append(len(gm.graph.nodes))
        settings.append({k: getattr(inductor_config, k) for k in CPU_COMPILE_OPTIONS})
        return gm.forward

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile",
                        lambda fn, **kw: compile_(fn, backend=counting_backend, **kw))
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=8):  # the default
        sg = StreamingGenerator(own_generator, StreamingConfig(max_batch_size=4,
                                                               enable_compilation=True))
        assert sg.engine.buckets == [1, 2, 4]
        sg.warmup(frames=2, all_buckets=True)
    assert len(sizes) == 3 * 4, sizes
    assert max(sizes) < 400, sizes  # one part's call, not an unrolled frame
    # on a CPU, every graph compiles with inductor's own kernels over frozen weights
    assert settings == [CPU_COMPILE_OPTIONS] * 12
    assert not inductor_config.freezing  # and only then
    assert sorted(sg.warmup_buckets) == sg.engine.buckets  # compile time reported per bucket
    eager = StreamingGenerator(own_generator, StreamingConfig(enable_compilation=False))
    got, ref = (torch.cat(list(g.generate_streaming("Bounded.", 0, max_audio_length_ms=480,
                                                    seed=2))) for g in (sg, eager))
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    assert len(sizes) == 12  # the stream ran on the graphs compiled in warm-up


def test_a_compiled_backbone_cuts_its_attention_with_one_graph_for_every_cut():
    """On a CPU a compiled backbone attends to the positions its streams can see, not the
    whole window: the cut (whole blocks of 512) goes in as a tensor of positions whose length
    dynamo takes as a dynamic size, so a stream growing through the window runs one graph.
    Cut or not, the sums are the whole window's (what lies past a query is masked: exact
    zeros, added in the same blocks)."""
    import dataclasses

    import torch._dynamo
    from torch._dynamo.backends.debugging import aot_eager

    from csm_streaming.model.csm import CSM, FLAVORS
    from csm_streaming.model.llama import attended_keys

    tiny = FLAVORS["tiny"]
    window = 1536  # three blocks
    model = CSM(dataclasses.replace(tiny, backbone=dataclasses.replace(tiny.backbone,
                                                                       max_seq_len=window)))
    caches = model.make_caches(1)
    for c in caches.backbone:  # stale entries everywhere: the mask must hide them
        c.k.normal_()
        c.v.normal_()
    graphs = []

    def counting_backend(gm, example_inputs):  # through AOTAutograd, as inductor traces: its
        graphs.append(example_inputs)  # contiguity guards must not split the whole window off
        return aot_eager(gm, example_inputs)

    torch._dynamo.reset()
    compiled = torch.compile(model.backbone, dynamic=False, backend=counting_backend)
    h = torch.randn(1, 1, tiny.backbone.dim)
    with torch.inference_mode():
        for seen in (10, 600, 1100, window):
            pos = torch.tensor([[seen - 1]])
            keys = attended_keys(window, seen)
            assert len(keys) == min(window, 512 * -(-seen // 512))
            whole = model.backbone(h, pos, caches.backbone)
            assert torch.equal(model.backbone(h, pos, caches.backbone, seen=seen), whole)
            assert torch.equal(compiled(h, pos, caches.backbone, keys=keys), whole)
    assert len(graphs) == 1, f"{len(graphs)} graphs for three cuts"
    assert any(isinstance(x, torch.SymInt) for x in graphs[0])  # the cut's length, dynamic


def test_mimi_takes_chunks_of_any_length_with_moshis_cuda_graphs_on(own_generator, monkeypatch):
    """On CUDA, moshi graphs each Mimi part at its first call's shape and refuses any other
    (a ValueError), but the engine's chunks vary (a first chunk, whole chunks, a stream's last
    frames) and so do context slices (the last is shorter). Made to behave as on CUDA here
    (moshi's graphs on: a second call would capture one, which a CPU cannot), a stream with
    context audio and chunks of several lengths must still run, and equal its plain run."""
    from moshi.utils import compile as moshi_compile

    from conftest import speech_like
    from csm_streaming.request import Segment

    context = [Segment(speaker=1, text="Before.", audio=speech_like(1.1))]  # 14 frames: 4 slices
    args = {"max_audio_length_ms": 1040, "seed": 1, "topk": 1}  # 13 frames: 2 + 4 + 4 + 3
    ref = own_generator.generate("Go on.", 0, context=context, **args)  # frame by frame
    init = moshi_compile.CUDAGraphed.__init__
    made = []

    def as_on_cuda(self, func, warmup_steps=1, disable=False):
        if isinstance(func, torch.nn.Module):  # Mimi's parts (not the exec-mask setter, whose
            disable = False                    # shape never changes)
            made.append(self)
        init(self, func, warmup_steps, disable)

    monkeypatch.setattr(moshi_compile.CUDAGraphed, "__init__", as_on_cuda)
    sg = StreamingGenerator(own_generator, StreamingConfig(chunk_size_ms=320))
    chunks = list(sg.generate_streaming("Go on.", 0, context=context, **args))
    assert made and all(g.disable for g in made)  # moshi's graphs were there, and turned off
    assert len({c.numel() for c in chunks if c.numel()}) >= 2  # chunks of several lengths
    torch.testing.assert_close(torch.cat(chunks), ref, atol=1e-4, rtol=0)
