"""The command line as a new user meets it: offline, random weights, mistakes, a remote server."""

import importlib.util
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import TOKEN, LiveServer, speech_like

ROOT = Path(__file__).resolve().parent.parent
SR = 24_000


def run_cli(*args, timeout=300, env=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    # from a scratch folder: a run without --output writes csm_output.wav where it runs
    return subprocess.run([sys.executable, str(ROOT / "test_streaming.py"), *args],
                          cwd=tempfile.gettempdir(),
                          capture_output=True, text=True, timeout=timeout, env=env)


def cli_module():
    from csm_streaming import cli

    return cli


def test_random_model_runs_offline_watermarked_and_short_by_default(tmp_path):
    """The README's offline example: no network, the watermark stage on (random weights),
    3 s by default since random weights never end, one '[done]' line, exactly the samples."""
    from csm_streaming.engine.loader import load_csm_1b

    out = tmp_path / "out.wav"
    r = run_cli("--model", "random:tiny", "--text", "Hello from the command line.", "--seed", "5",
                "--output", str(out), "--no-dashboard", "-v")
    assert r.returncode == 0, r.stderr
    assert "wrote 2.96 s" in r.stderr and r.stdout.count("[done]") == 1
    assert r.stderr.count("silentcipher's classes with random weights") == 1
    # each stage's cost, said once: the model's frame steps, Mimi's decode, the watermark
    stages = [line for line in r.stderr.splitlines() if line.startswith("stages: ")]
    assert len(stages) == 1 and all(f"{k} " in stages[0] for k in ("model", "mimi", "watermark"))
    audio, sr = sf.read(out, dtype="float32")
    assert sr == SR and audio.shape == (37 * 1920,)
    # the stream is marked in windows, generate() as a whole: the same plain audio below
    plain = load_csm_1b("cpu", "random:tiny", watermark=False).generate(
        "Hello from the command line.", 0, seed=5)
    assert (torch.from_numpy(audio) - plain).abs().mean() < 0.05 * plain.abs().mean()


def test_without_the_watermark_it_equals_generate(tmp_path):
    from csm_streaming.engine.loader import load_csm_1b

    out = tmp_path / "out.wav"
    r = run_cli("--model", "random:tiny", "--text", "Hello.", "--seed", "5", "--max-audio-ms",
                "1200", "--output", str(out), "--no-dashboard", "--no-watermark")
    assert r.returncode == 0, r.stderr
    warning = [line for line in r.stderr.splitlines() if "watermarking is off" in line]
    assert warning == ["warning: watermarking is off: the audio will not carry the CSM-1B "
                       "watermark that Sesame asks users to keep"]  # one line, no source listing
    audio, _ = sf.read(out, dtype="float32")
    ref = load_csm_1b("cpu", "random:tiny", watermark=False).generate(
        "Hello.", 0, max_audio_length_ms=1200, seed=5)
    torch.testing.assert_close(torch.from_numpy(audio), ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("args, words", [
    (["--text", " "], "text must be a non-empty string"),
    (["--speaker", "-1"], "speaker must be an integer >= 0"),
    (["--temperature", "0"], "temperature must be a number in (0, 10]"),
    (["--topk", "0"], "top_k must be an integer >= 1"),
    (["--max-audio-ms", "10"], "max_audio_length_ms must be at least 80"),
    (["--context-audio", "no-such.wav", "--context-text", "hi"], "no such file: no-such.wav"),
    (["--context-audio", str(ROOT / "README.md"), "--context-text", "hi"],
     "not a readable audio file"),
    (["--context-audio", "a.wav"], "pairs"),
    (["--chunk-size", "100"], "multiple of 80"),
    (["--output", "/no/such/dir/o.wav"], "does not exist"),
    (["--play-audio"], "cannot open the audio output"),
    (["--server", "ftp://x"], "must be a URL"),
    (["--quantize", "int4", "--device", "cuda"], "int4 weights run on the CPU only")])
def test_mistakes_are_caught_before_anything_is_loaded(args, words):
    r = run_cli("--model", "random:tiny", *args, env={"JACK_DEFAULT_SERVER": "no-such-server"})
    assert r.returncode == 2 and words in r.stderr, r.stderr
    assert "loaded" not in r.stderr and "Traceback" not in r.stderr  # nothing was loaded


def test_offline_default_model_fails_at_once_with_command_line_advice():
    r = run_cli(env={"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "https://hub.invalid"}, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "cannot be reached" in r.stderr and "--model random:csm-1b" in r.stderr
    assert [line[:6] for line in r.stderr.splitlines()] == ["error:"]  # one line


def test_compile_follows_the_config_default():
    cli = cli_module()
    args = cli.build_parser().parse_args([])
    assert args.compile is None  # StreamingConfig decides: CUDA only
    from csm_streaming.engine.config import StreamingConfig

    assert not StreamingConfig(enable_compilation=args.compile).compile_enabled(torch.device("cpu"))
    assert cli.build_parser().parse_args(["--compile"]).compile is True
    assert cli.build_parser().parse_args(["--no-compile"]).compile is False


def test_it_plays_through_the_sound_card(jack_device, tmp_path):
    env_server = os.environ.get("JACK_DEFAULT_SERVER")
    r = run_cli("--model", "random:tiny", "--play-audio", "--max-audio-ms", "800", "--seed", "1",
                "--no-dashboard", "--output", str(tmp_path / "p.wav"))
    assert env_server and r.returncode == 0, r.stderr
    assert "underruns" in r.stderr


def test_it_listens_to_a_remote_server(tmp_path, tiny_generator):
    """--server: the same dashboard and output, the audio from a server's WebSocket, with the
    context file sent along; metrics measured at this end."""
    live = LiveServer(max_streams=2)
    ctx = tmp_path / "turn.wav"
    sf.write(ctx, np.stack([speech_like(0.5).numpy()] * 2, axis=1), 44_100)  # stereo, 44.1 kHz
    out = tmp_path / "remote.wav"
    try:
        r = run_cli("--server", live.url, "--token", TOKEN, "--text", "From afar.", "--seed", "3",
                    "--topk", "1", "--max-audio-ms", "800", "--context-audio", str(ctx),
                    "--context-text", "Before.", "--context-speaker", "1", "--output", str(out),
                    "--no-dashboard", "--model", "this/is-ignored")
        bad = run_cli("--server", live.url, "--token", "wrong", "--text", "Hi.")
    finally:
        live.close()
    assert r.returncode == 0, r.stderr
    assert "(remote)" in r.stdout and "first audio" in r.stderr and "loaded" not in r.stderr
    from csm_streaming.request import Segment

    data, rate = sf.read(ctx, dtype="float32", always_2d=True)
    solo = tiny_generator.generate(
        "From afar.",
        0,
        [Segment(1, "Before.", torch.from_numpy(data.T.copy()), rate)],
        max_audio_length_ms=800,
        seed=3,
        topk=1,
    )
    audio, _ = sf.read(out, dtype="float32")
    quantized = torch.from_numpy(np.clip(solo.numpy(), -1, 1) * 32767).round() / 32767
    torch.testing.assert_close(torch.from_numpy(audio), quantized, atol=1.5 / 32767, rtol=0)
    assert bad.returncode == 2 and "401" in bad.stderr and "--token" in bad.stderr
    r = run_cli("--server", "http://127.0.0.1:9", "--text", "Hi.")  # nobody there
    assert r.returncode == 2 and "no CSM server answers" in r.stderr and "ssh -N -L" in r.stderr


def test_the_remote_client_needs_no_torch():
    code = ("import sys; sys.modules['torch'] = None\n"  # importing torch would fail
            "from csm_streaming import request\n"
            "from csm_streaming.client import remote, playback, dashboard\n"
            "request.GenerationRequest('Hi.', 0)\n"
            "print(remote.ws_url('https://box:8443/csm'))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "wss://box:8443/csm/v1/stream"


def test_the_snapshot_says_when_it_buffers_for_a_slow_generator():
    from csm_streaming.client.playback import AudioPlayer
    from csm_streaming.client.terminal import snapshot
    from csm_streaming.metrics import StreamMetrics

    m = StreamMetrics(elapsed_s=3.0, audio_s=1.5, frames=18, chunks=3, chunk_gen_ms=[900.0] * 3,
                      chunk_rtf=[2.0] * 3)
    player = AudioPlayer(SR, prebuffer_s=4.0)
    player.write(np.zeros(int(1.5 * SR), dtype=np.float32))
    s = snapshot(m, player, "generating")
    assert s.status.startswith("buffering 1500 / 4000 ms")
    assert any("slower than real time (RTF 2.00)" in e for e in s.events)


# The package's commands by module; the clone's scripts by file
TOOLS = ["csm_streaming.cli", "csm_streaming.server.app", "csm_streaming.server.ray_serve",
         "csm_streaming.verify_watermark", "deploy_vast.py", "benchmarks/bench_frame.py",
         "benchmarks/bench_streaming.py", "benchmarks/bench_server.py",
         "benchmarks/bench_watermark.py", "benchmarks/bench_quantize.py",
         "benchmarks/profile_frame.py"]


def _tool_module(tool: str):
    if not tool.endswith(".py"):
        return importlib.import_module(tool)
    spec = importlib.util.spec_from_file_location(f"tool_{Path(tool).stem}", ROOT / tool)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    sys.path.insert(0, str((ROOT / tool).parent))
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path.pop(0)
    return mod


@pytest.mark.parametrize("tool", TOOLS)
def test_every_flag_has_help_and_a_shown_default(tool):
    """--help of every tool: each option explained, each default shown once."""
    import argparse

    argv = [str(ROOT / tool)] if tool.endswith(".py") else ["-m", tool]
    r = subprocess.run([sys.executable, *argv, "--help"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    parser = _tool_module(tool).build_parser()
    assert issubclass(parser.formatter_class, argparse.ArgumentDefaultsHelpFormatter)
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            assert action.help and action.help.strip(), (
                f"{tool}: {action.option_strings} has no help"
            )
    assert "(default:" in r.stdout
    # each default once: no option says it twice (its own words, then argparse's)
    flat = " ".join(r.stdout.split())
    options = re.split(r" (?=-{1,2}[a-z])", flat)
    assert not [o for o in options if o.count("(default") + o.count("(None:") > 1], tool


def test_the_frame_profile_finds_every_product_of_every_part_and_undoes_its_labels(own_generator):
    """profile_frame.py on the tiny model: each part's matrix products counted once a frame
    (4 a layer: q/k/v, output, gate/up, down), every part timed, and the model left as it was."""
    import csm_streaming.model.csm as csm_module

    prof = _tool_module("benchmarks/profile_frame.py")
    model, sampler = own_generator.model, csm_module.sample_topk
    frame_bytes = importlib.import_module("common").weight_bytes_per_frame(model)  # bench_frame's
    probe = {"dram": 40e9, "cache": 160e9, "usable_cache_bytes": 2**40}
    result = prof.profile(model, own_generator.text_tokenizer, torch.device("cpu"), streams=2,
                          frames=2, probe=probe)
    rows = {r["part"]: r for r in result["rows"]}
    # each part's floor as frame_floor reads it: the depth decoder 30 of 31 times from cache
    assert rows["backbone"]["floor_ms"] == pytest.approx(rows["backbone"]["weight_gb"] / 40 * 1e3)
    assert rows["depth decoder"]["floor_ms"] < rows["depth decoder"]["weight_gb"] / 40 * 1e3 / 3
    steps, args = model.args.audio_num_codebooks - 1, model.args
    assert rows["backbone"]["product_calls"] == 4 * args.backbone.num_layers
    assert rows["depth decoder"]["product_calls"] == 4 * args.decoder.num_layers * steps
    assert rows["projection"]["product_calls"] == rows["audio heads"]["product_calls"] == steps
    assert rows["codebook-0 head"]["product_calls"] == 1
    assert all(rows[p]["ms"] > 0 for p in prof.PARTS)
    assert rows["backbone"]["attention_ms"] > 0 and rows["sampler"]["products_ms"] == 0
    assert rows["frame step"]["weight_gb"] * 1e9 == pytest.approx(frame_bytes)
    assert "audio_logits" not in vars(model) and csm_module.sample_topk is sampler
    assert not model.backbone._forward_hooks and not model.decoder._forward_pre_hooks


def test_the_floor_reads_the_depth_decoder_from_cache_only_where_one_step_fits(own_generator):
    """common.frame_floor: what is read once a frame comes from DRAM; the depth decoder and the
    projection (31 reads) from DRAM once and from cache 30 times where one step's weights fit
    in the usable cache, else from DRAM every time. A step faster than its floor is a defect."""
    common = importlib.import_module("common")
    model = own_generator.model
    parts = common.weight_bytes_by_part(model)
    repeated = parts["depth decoder"] + parts["projection"]
    once, step = sum(parts.values()) - repeated, repeated / 31
    probe = {"dram": 10e9, "cache": 50e9, "usable_cache_bytes": int(step) + 1}
    fits = common.frame_floor(model, probe)
    assert fits["depth_step_in_cache"] and fits["floor_ms"] == pytest.approx(
        ((once + step) / 10e9 + 30 * step / 50e9) * 1e3)
    assert sum(fits["parts_floor_ms"].values()) == pytest.approx(fits["floor_ms"])
    too_big = common.frame_floor(model, {**probe, "usable_cache_bytes": int(step) - 1})
    assert not too_big["depth_step_in_cache"]
    assert too_big["floor_ms"] == pytest.approx(sum(parts.values()) / 10e9 * 1e3)
    assert common.floor_check({"dtype": "x", "ours_ms": 2 * fits["floor_ms"], **fits}
                              ).get("floor_defect") is None
    beat = common.floor_check({"dtype": "x", "ours_ms": fits["floor_ms"] / 2, **fits})
    assert "floor is wrong" in beat["floor_defect"]


def test_the_bandwidth_probe_tells_dram_from_cache():
    """The cache size it calls usable is one its probe read at >= 1.5x the product's DRAM rate
    (what the choice guarantees; which size that is depends on this machine)."""
    common = importlib.import_module("common")
    probe = common.memory_bandwidth(torch.device("cpu"), gib=0.25, repeats=1)
    assert probe["dram"] == max(probe["probes_gb_s"].values()) * 1e9
    if probe["llc_bytes"]:
        assert len(probe["cache_curve_gb_s"]) == 5
        usable = probe["usable_cache_bytes"]
        if usable:
            rate = probe["cache_curve_gb_s"][f"{usable / 2**20:g} MiB"]
            assert rate >= 1.5 * probe["probes_gb_s"]["gemv"]
        assert probe["cache"] / 1e9 == probe["cache_curve_gb_s"][
            f"{probe['llc_bytes'] // 4 / 2**20:g} MiB"]


def test_without_output_or_playback_the_audio_goes_to_a_default_file(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "test_streaming.py"), "--model", "random:tiny",
                        "--no-watermark", "--max-audio-ms", "400", "--no-dashboard"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    written = tmp_path / "csm_output.wav"
    assert str(written) in r.stderr and sf.info(written).frames == 5 * 1920
