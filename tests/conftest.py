"""Shared fixtures: tiny random models built in-process (no download), one Mimi per session."""

import atexit
import logging
import os
import shutil
import subprocess
import tempfile
import time
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may reach the network
# Quantized weights kept for the next start (model/weight_cache.py) go to a folder of the run's
# own (session fixtures), and each test gets one of its own (below): never the user's cache,
# never another test's weights
_CACHE = tempfile.mkdtemp(prefix="csm-test-cache-")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
os.environ["CSM_CACHE_DIR"] = _CACHE
# Under pytest-xdist (-n N) each worker gets its share of the cores: threads beyond them make
# torch's OpenMP workers wait on each other.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))
logging.getLogger("transformers").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=".*pad_token_id.*|.*bos_token_id.*|.*audio_.*token_id.*")

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


@pytest.fixture(autouse=True)
def own_weight_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CSM_CACHE_DIR", str(tmp_path / "csm-cache"))


def tiny_hf_config(rope=LLAMA3_ROPE):
    """A transformers CsmConfig with the shapes of our 'tiny' flavour (and a small codec)."""
    from transformers import CsmConfig

    return CsmConfig(
        text_vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        rope_parameters=dict(rope),
        depth_decoder_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2,
                                  backbone_hidden_size=64, rope_parameters=dict(rope)),
        codec_config=dict(num_hidden_layers=1, hidden_size=64, upsample_groups=64, num_filters=8,
                          intermediate_size=64, codebook_dim=16, num_attention_heads=2,
                          num_key_value_heads=2, head_dim=32),
        bos_token_id=1, eos_token_id=2, pad_token_id=3, audio_token_id=4, audio_eos_token_id=5)


def make_hf_checkpoint(folder, rope=LLAMA3_ROPE, seed=0):
    """Write a transformers-format tiny CSM (save_pretrained) and a tokenizer.json; return it."""
    from transformers import CsmForConditionalGeneration

    from csm_streaming.model.checkpoints import random_text_tokenizer

    torch.manual_seed(seed)
    hf = CsmForConditionalGeneration(tiny_hf_config(rope)).eval()
    with torch.no_grad():  # transformers' init leaves norms at 1 and some weights tiny: spread them
        for name, p in hf.named_parameters():
            if not name.startswith("codec_model") and p.dim() > 1:
                p.normal_(0, 0.1)
            elif not name.startswith("codec_model"):
                p.uniform_(0.5, 1.5)
    hf.save_pretrained(folder)
    random_text_tokenizer().save(str(folder / "tokenizer.json"))
    return hf


@pytest.fixture(scope="session")
def mimi():
    from csm_streaming.model.checkpoints import load_mimi

    return load_mimi("random", "cpu")


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf_tiny")
    hf = make_hf_checkpoint(folder)
    return hf, folder


def make_tiny_generator(mimi, device="cpu", **kwargs):
    """A plain reference Generator on random:tiny (no watermark) with a model of its own."""
    from csm_streaming.engine.reference import Generator
    from csm_streaming.model.checkpoints import load_mimi, load_model_and_tokenizer

    model, tok, _ = load_model_and_tokenizer("random:tiny", torch.device(device))
    if device != "cpu":
        mimi = load_mimi("random", device)
    return Generator(model, tok, mimi, torch.device(device), **kwargs)


# Equality tests run on every device present: the CPU always, CUDA and MPS where there is one
# (`pytest -m gpu` selects those; without the device they are skipped, saying so).
def on_gpu(name: str) -> list:
    """Marks of a test case that needs the accelerator `name` (cuda, mps)."""
    present = (torch.cuda.is_available() if name == "cuda" else torch.backends.mps.is_available())
    return [pytest.mark.gpu, pytest.mark.skipif(not present, reason=f"no {name} device here")]


DEVICES = ["cpu"] + [pytest.param(name, marks=on_gpu(name)) for name in ("cuda", "mps")]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture
def device_generator(device, mimi):
    """A Generator of the test's own on `device` (see DEVICES)."""
    return make_tiny_generator(mimi, device)


@pytest.fixture(scope="session")
def tiny_generator(mimi):
    """The shared reference Generator: tests must not change it (see own_generator)."""
    return make_tiny_generator(mimi)


@pytest.fixture
def own_generator(mimi):
    """A Generator of the test's own, for tests that patch its model or change its settings."""
    return make_tiny_generator(mimi)


def speech_like(seconds=1.0, sr=24_000, seed=0):
    """A deterministic voiced signal: harmonics with a syllable-rate envelope."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(int(seconds * sr)) / sr
    f0 = 120 + 20 * torch.sin(2 * torch.pi * 0.5 * t)
    phase = 2 * torch.pi * torch.cumsum(f0, 0) / sr
    x = sum(torch.sin(k * phase) / k for k in range(1, 6))
    env = 0.5 * (1 - torch.cos(2 * torch.pi * 4 * t)).clamp(min=0)
    return (0.2 * x * env + 0.005 * torch.randn(t.shape, generator=g)).float()


def patch_sample_frame(model, fn):
    """Wrap model.sample_frame: fn(codes [B, 32], sampling state) -> codes. Returns the undo.

    Tests use it to force end frames, stuck frames and the like with pure device ops, as the
    real step would produce them.
    """
    original = model.sample_frame

    def patched(h, s, caches, slot=None, **parts):
        return fn(original(h, s, caches, slot, **parts), s)

    model.sample_frame = patched
    return lambda: model.__dict__.pop("sample_frame", None)


TOKEN = "test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class LiveServer:
    """The real server (uvicorn on 127.0.0.1, a free port) over random:tiny, in this process."""

    def __init__(self, max_streams=16, max_queue=32, settings=None, watermarker=None, voices=None,
                 chat=None, **config):
        from csm_streaming.engine.config import StreamingConfig
        from csm_streaming.engine.frontend import StreamingGenerator
        from csm_streaming.engine.reference import Generator
        from csm_streaming.model.checkpoints import load_mimi, load_model_and_tokenizer
        from csm_streaming.server.api import ServerSettings
        from csm_streaming.server.app import create_app, serve_in_thread
        from csm_streaming.server.engine_thread import EngineThread

        model, tok, _ = load_model_and_tokenizer("random:tiny", torch.device("cpu"))
        gen = Generator(model, tok, load_mimi("random", "cpu"), watermarker=watermarker)
        sg = StreamingGenerator(gen, StreamingConfig(max_batch_size=max_streams, **config))
        self.engine_thread = EngineThread(sg, max_queue=max_queue).start()
        self.settings = settings or ServerSettings(token=TOKEN, max_body_bytes=2 * 2**20)
        self.app = app = create_app(self.engine_thread, self.settings, voices=voices, chat=chat)
        self.server, self.thread, self.url = serve_in_thread(app, settings=self.settings)
        self.port = int(self.url.rsplit(":", 1)[1])

    def close(self):
        self.server.should_exit = True
        self.thread.join(10)
        self.engine_thread.stop()


@pytest.fixture(scope="session")
def jack_device():
    if shutil.which("jackd") is None:
        pytest.skip("jackd is not installed (bash setup.sh --dev installs it as root)")
    env = dict(os.environ, JACK_NO_AUDIO_RESERVATION="1")
    server = f"csmtest{os.getpid()}"
    env["JACK_DEFAULT_SERVER"] = server
    proc = subprocess.Popen(
        ["jackd", "--no-realtime", "-n", server, "-d", "dummy", "-r", str(24_000), "-p", "1920"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.environ["JACK_DEFAULT_SERVER"] = server
    try:
        import sounddevice as sd

        device = None
        for _ in range(50):
            sd._terminate()
            sd._initialize()
            jack = [i for i, h in enumerate(sd.query_hostapis()) if "JACK" in h["name"]]
            outs = [d["index"] for d in sd.query_devices()
                    if jack and d["hostapi"] == jack[0] and d["max_output_channels"] > 0]
            if outs:
                device = outs[0]
                break
            time.sleep(0.1)
        if device is None:
            pytest.fail("jackd started but PortAudio shows no JACK output device")
        yield device
    finally:
        # PortAudio must let go of the JACK server before it stops, or it aborts the process
        import sounddevice as sd

        sd._terminate()
        proc.terminate()
        proc.wait(5)
        os.environ.pop("JACK_DEFAULT_SERVER", None)
        sd._initialize()


def wait_until_healthy(proc, base: str, timeout_s: float = 120):
    """Poll a server process's /health until it answers; fail with its output if it exits or
    does not answer in time (a waiting bound, not a measurement)."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            httpx.get(f"{base}/health", timeout=2).raise_for_status()
            return
        except httpx.HTTPError:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.5)


# A wav2vec 2.0 CTC vocabulary as facebook/wav2vec2-base-960h's: blank, word delimiter, letters
ALIGN_VOCAB = {"<pad>": 0, "|": 1, "'": 2,
               **{chr(ord("A") + i): i + 3 for i in range(26)}}


class HearsLettersBetween(torch.nn.Module):
    """A stand-in wav2vec 2.0 CTC model: any letter equally likely from step `lo` to `hi`
    (20 ms steps), silence (blank) elsewhere, whatever the audio. An aligner over it puts a
    phrase's words in that window, where the estimate spreads them over the whole phrase."""

    def __init__(self, lo: int, hi: int):
        super().__init__()
        from types import SimpleNamespace

        self.lo, self.hi = lo, hi
        self.config = SimpleNamespace(inputs_to_logits_ratio=320)
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # its device

    def forward(self, x):
        from types import SimpleNamespace

        logits = torch.full((1, x.shape[1] // 320, len(ALIGN_VOCAB)), -20.0)
        logits[0, :, 0] = 0.0
        logits[0, self.lo:self.hi, :] = 0.0
        return SimpleNamespace(logits=logits)


def letters_heard_between(lo: int, hi: int):
    """A word aligner (engine/word_align.CtcAligner) over HearsLettersBetween(lo, hi)."""
    from csm_streaming.engine.word_align import CtcAligner

    return CtcAligner(HearsLettersBetween(lo, hi), ALIGN_VOCAB, blank=0)

