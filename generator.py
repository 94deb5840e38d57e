"""The upstream-compatible API: Segment, load_csm_1b, Generator.generate.

`Generator` runs the plain eager loop, one frame at a time, like Sesame's release. It is also the
reference the streaming engine is tested against, so it stays simple on purpose.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from models import CSM, FLAVORS, MIMI_CODES, SamplingState, build_model, checkpoint_files, load_state
from normalize import normalize_text
from runaway import TailConfig, TailGuard

log = logging.getLogger("csm")

SAMPLE_RATE = 24_000
FRAME_MS = 80
FRAME_SAMPLES = SAMPLE_RATE * FRAME_MS // 1000  # 1920
DEFAULT_REPO = "unsloth/csm-1b"  # an ungated copy of the release (transformers format)
OFFICIAL_REPO = "sesame/csm-1b"  # gated: accept the licence on its hub page first
MIMI_REPO = "kyutai/moshiko-pytorch-bf16"
MIMI_NAME = "tokenizer-e351c8d8-checkpoint125.safetensors"
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"

# End of speech. The release stops at a frame whose 32 codes are all 0. Sampled at T=0.9 the 31
# depth codes of that frame are not always all 0, and the stream then runs on as a silent tail
# (csm#122). Codebook 0 (the backbone's choice) must be 0, and at least EOS_MIN_ZERO_CODES of the
# 32 codes: a real speech frame has almost never 24 zero codes, a missed end frame almost always.
EOS_MIN_ZERO_CODES = 24


def is_eos(codes: torch.Tensor, min_zero_codes: int = EOS_MIN_ZERO_CODES) -> torch.Tensor:
    """codes [..., 32] -> bool [...]: does this frame end the speech?"""
    return (codes[..., 0] == 0) & ((codes == 0).sum(-1) >= min_zero_codes)


class CheckpointError(RuntimeError):
    """Weights could not be found or read; the message says what to do."""


class EmptyOutputError(RuntimeError):
    """The model ended before any audio frame, on every retry."""

    def __init__(self, tries: int):
        super().__init__(f"the model ended before any audio on {tries} tries; rephrase the text "
                         "(spell out symbols) or raise the temperature")


MAX_EMPTY_RETRIES = 2


def retry_request(req: "GenerationRequest", attempt: int) -> tuple["GenerationRequest", str]:
    """The next try after an empty output, cooler and narrower, and the event that says so."""
    req = replace(req, temperature=max(0.3, round(req.temperature * 0.7, 4)), topk=max(1, req.topk // 2))
    return req, f"no audio: retry {attempt} with temperature {req.temperature:g}, top-k {req.topk}"


@dataclass
class Segment:
    """One turn of context: who spoke, what they said, and the audio of it.

    audio: [samples] or [channels, samples] (or [samples, channels]) at `sample_rate`; it is
    mixed to mono and resampled to 24 kHz.
    """

    speaker: int
    text: str
    audio: torch.Tensor
    sample_rate: int = SAMPLE_RATE


@dataclass(frozen=True)
class GenerationRequest:
    """A validated request: everything the frame loop needs, checked before any model work."""

    text: str
    speaker: int
    context: tuple[Segment, ...] = ()
    max_audio_length_ms: float = 90_000
    temperature: float = 0.9
    topk: int = 50
    seed: int | None = None

    @property
    def max_frames(self) -> int:
        return max(1, int(self.max_audio_length_ms // FRAME_MS))


def validate_request(text, speaker, context=(), max_audio_length_ms=90_000, temperature=0.9,
                     topk=50, seed=None) -> GenerationRequest:
    """Check every argument and raise a ValueError that names the bad one."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("text must be a non-empty string (got %r)" % (text,))
    _check_speaker(speaker, "speaker")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0 (got {temperature!r})")
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise ValueError(f"topk must be an integer >= 1 (got {topk!r})")
    if isinstance(max_audio_length_ms, bool) or not isinstance(max_audio_length_ms, (int, float)) \
            or not math.isfinite(max_audio_length_ms) or max_audio_length_ms < FRAME_MS:
        raise ValueError(f"max_audio_length_ms must be at least {FRAME_MS} (one frame) "
                         f"(got {max_audio_length_ms!r})")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise ValueError(f"seed must be None or an integer >= 0 (got {seed!r})")
    context = tuple(context or ())
    for i, seg in enumerate(context):
        if not isinstance(seg, Segment):
            raise ValueError(f"context[{i}] must be a Segment (got {type(seg).__name__})")
        _check_speaker(seg.speaker, f"context[{i}].speaker")
        if not isinstance(seg.text, str):
            raise ValueError(f"context[{i}].text must be a string")
        audio = torch.as_tensor(seg.audio)
        if audio.numel() == 0:
            raise ValueError(f"context[{i}].audio is empty: give the audio of the turn")
        if audio.dim() > 2:
            raise ValueError(f"context[{i}].audio must be 1-D or 2-D (got shape {tuple(audio.shape)})")
        if not torch.isfinite(audio.float()).all():
            raise ValueError(f"context[{i}].audio contains NaN or infinite samples")
        if not isinstance(seg.sample_rate, int) or seg.sample_rate <= 0:
            raise ValueError(f"context[{i}].sample_rate must be a positive integer")
    return GenerationRequest(text.strip(), speaker, context, float(max_audio_length_ms),
                             float(temperature), int(topk), seed)


def _check_speaker(speaker, name: str):
    if isinstance(speaker, bool) or not isinstance(speaker, int) or speaker < 0:
        raise ValueError(f"{name} must be an integer >= 0 (got {speaker!r})")


# ---------------------------------------------------------------------------------------------
# Audio helpers
# ---------------------------------------------------------------------------------------------


def resample(x: np.ndarray, src: int, dst: int) -> np.ndarray:
    """1-D float32 audio from `src` Hz to `dst` Hz (soxr, high quality); float32 out."""
    x = np.asarray(x, dtype=np.float32)
    if src == dst:
        return x
    import soxr

    return soxr.resample(x, src, dst, quality="HQ").astype(np.float32)


def to_mono_24k(audio, sample_rate: int) -> torch.Tensor:
    """Any [samples] / [channels, samples] / [samples, channels] audio -> float32 mono at 24 kHz."""
    audio = torch.as_tensor(audio).float()
    if audio.dim() == 2:
        channel_dim = 0 if audio.shape[0] <= audio.shape[1] else 1
        audio = audio.mean(dim=channel_dim)
    if sample_rate != SAMPLE_RATE:
        audio = torch.from_numpy(resample(audio.cpu().numpy(), sample_rate, SAMPLE_RATE))
    return audio.contiguous()


def load_audio(path) -> tuple[torch.Tensor, int]:
    """Read an audio file (wav, flac, ogg...) -> ([channels, samples] float32, sample rate)."""
    import soundfile as sf

    data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    return torch.from_numpy(data.T.copy()), sr


def save_audio(path, audio: torch.Tensor, sample_rate: int = SAMPLE_RATE):
    import soundfile as sf

    sf.write(str(path), audio.detach().float().cpu().numpy(), sample_rate, subtype="FLOAT")


# ---------------------------------------------------------------------------------------------
# Loading: checkpoint, tokenizer, Mimi
# ---------------------------------------------------------------------------------------------

_META_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _pick_weight_files(names: list[str]) -> list[str]:
    for name in ("model.safetensors", "ckpt.pt"):
        if name in names:
            return [name]
    for index in ("transformers.safetensors.index.json", "model.safetensors.index.json"):
        if index in names:
            prefix = index.split(".")[0]
            return [index] + [n for n in names if n.startswith(prefix) and n.endswith(".safetensors")
                              and n != "model.safetensors"]
    raise CheckpointError(f"the repo holds no CSM weights (files: {sorted(names)[:10]})")


def resolve_checkpoint(model: str) -> Path:
    """A local folder, a local weight file, or a hub repo id -> a local folder (or file)."""
    path = Path(model).expanduser()
    if path.exists():
        return path
    if model.count("/") != 1 or model.startswith((".", "/")):
        raise CheckpointError(f"'{model}' is neither an existing file or folder nor a hub repo id "
                              "like 'owner/name'")
    import huggingface_hub as hub
    from huggingface_hub import errors

    try:  # the cache first: works offline and costs no request
        cached = Path(hub.snapshot_download(model, local_files_only=True,
                                            allow_patterns=list(_META_FILES) + ["*.safetensors*", "ckpt.pt"]))
        if all(f.is_file() for f in checkpoint_files(cached)) and (cached / "tokenizer.json").is_file():
            return cached
        log.info("the cached copy of %s is incomplete: downloading the rest", model)
    except (errors.LocalEntryNotFoundError, FileNotFoundError, KeyError, ValueError):
        pass  # not cached, or cached without weights (an interrupted download)
    token_hint = ("set HF_TOKEN (or run `hf auth login`) with an account that accepted the licence "
                  f"at https://huggingface.co/{model}")
    try:
        names = hub.list_repo_files(model)
        wanted = _pick_weight_files(names) + [n for n in _META_FILES if n in names]
        folder = None
        for name in wanted:
            folder = Path(hub.hf_hub_download(model, name)).parent
        return folder
    except errors.GatedRepoError as e:
        raise CheckpointError(f"{model} is gated: {token_hint}. Or use the ungated default "
                              f"'{DEFAULT_REPO}', or a local folder.") from e
    except errors.RepositoryNotFoundError as e:
        raise CheckpointError(f"{model} was not found on the hub (or is private): check the name, "
                              f"or {token_hint}") from e
    except CheckpointError:
        raise
    except Exception as e:  # network down, offline mode, proxy: all end here
        raise CheckpointError(
            f"could not download {model} and it is not in the Hugging Face cache "
            f"({hub.constants.HF_HUB_CACHE}): {type(e).__name__}: {str(e)[:200]}. Connect to the "
            "internet (or unset HF_HUB_OFFLINE), run `python deploy_vast.py --download` on a "
            "machine that can, pass a local folder with model=..., or use model='random:csm-1b' "
            "to run the same code with random weights.") from e


def load_text_tokenizer(path: Path):
    """The checkpoint's own tokenizer.json, with BOS/EOS around every encoded segment."""
    from tokenizers import Tokenizer
    from tokenizers.processors import TemplateProcessing

    tok = Tokenizer.from_file(str(path))
    bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
    if bos is None or eos is None:
        raise CheckpointError(f"{path} has no {BOS} / {EOS} tokens: not a Llama-3 tokenizer")
    tok.post_processor = TemplateProcessing(single=f"{BOS}:0 $A:0 {EOS}:0",
                                            special_tokens=[(BOS, bos), (EOS, eos)])
    return tok


_TINY_CORPUS = """The quick brown fox jumps over the lazy dog. Hello from Sesame, this is a test of
streaming speech. How are you doing today? I am fine, thank you very much! Numbers like one, two,
three and 42 or 3.14 appear too. Let us talk about the weather, the news and the time of day.
[0] [1] [2] [3] Speaker zero said something; speaker one answered, quietly and slowly."""


def random_text_tokenizer(vocab_size: int = 512):
    """A small byte-level BPE trained in memory (no download): for random models only."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from tokenizers.processors import TemplateProcessing

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([_TINY_CORPUS] * 4, trainer=trainer)
    tok.post_processor = TemplateProcessing(single=f"{BOS}:0 $A:0 {EOS}:0",
                                            special_tokens=[(BOS, tok.token_to_id(BOS)),
                                                            (EOS, tok.token_to_id(EOS))])
    return tok


def load_mimi(spec: str | None, device):
    """Mimi through moshi's loader. spec: None (Kyutai's repo), 'random', a file or a repo id."""
    from moshi.models import loaders

    if spec == "random":
        with torch.random.fork_rng(devices=[]):  # the same random codec in every process
            torch.manual_seed(0)
            mimi = loaders.get_mimi(None, device=device)
        _randomize_codebooks(mimi)
    else:
        path = Path(spec).expanduser() if spec else None
        if path is None or not path.exists():
            repo = spec or MIMI_REPO
            try:
                import huggingface_hub as hub

                path = Path(hub.hf_hub_download(repo, MIMI_NAME))
            except Exception as e:
                raise CheckpointError(
                    f"could not get the Mimi codec ({repo}/{MIMI_NAME}): {type(e).__name__}. "
                    "Connect to the internet, pass mimi=<local .safetensors file>, or "
                    "mimi='random' for a codec with random weights.") from e
        mimi = loaders.get_mimi(str(path), device=device)
    mimi.set_num_codebooks(32)
    return mimi.eval()


@torch.no_grad()
def _randomize_codebooks(mimi, seed: int = 0):
    """moshi's random Mimi has all-zero codebooks, so every input encodes to code 0. Give them
    random centroids, so encoded context audio yields varied codes, as a trained codec does."""
    g = torch.Generator().manual_seed(seed)
    for name, buf in mimi.named_buffers():
        if name.endswith("_codebook.embedding_sum"):
            buf.copy_(torch.randn(buf.shape, generator=g).to(buf) * 0.1)
        elif name.endswith("_codebook._initialized"):
            buf.fill_(1.0)


def pick_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' -> cuda, then mps, then cpu. An explicit device that cannot be used is an error."""
    if str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but CUDA is not available "
                           "(no GPU, or a CPU-only torch): use device='cpu' or 'auto'")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError("device 'mps' was asked for but is not available: use 'cpu' or 'auto'")
    return device


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_model_and_tokenizer(model: str, device: torch.device, dtype: torch.dtype | None = None):
    """-> (CSM on device, tokenizer, description). `random:<flavour>` builds random weights."""
    dtype = dtype or default_dtype(device)
    if model.startswith("random:"):
        flavour = model.split(":", 1)[1]
        if flavour not in FLAVORS:
            raise ValueError(f"unknown random model '{model}': use one of "
                             + ", ".join(f"random:{f}" for f in FLAVORS))
        args = FLAVORS[flavour]
        tok = random_text_tokenizer(min(512, args.text_vocab_size))
        return build_model(args, None, device, dtype), tok, f"{flavour} (random weights)"
    path = resolve_checkpoint(model)
    folder = path if path.is_dir() else path.parent
    files = checkpoint_files(folder) if path.is_dir() else [path]
    config_file = folder / "config.json"
    config = None
    if config_file.is_file():
        import json

        config = json.loads(config_file.read_text())
        if config.get("model_type") not in (None, "csm"):
            config = None  # not a CsmConfig (an original-format folder may hold its own)
    args, state, fmt = load_state(files, config)
    if not (folder / "tokenizer.json").is_file():
        raise CheckpointError(f"{folder} has no tokenizer.json: copy the checkpoint's tokenizer.json "
                              "beside the weights")
    tok = load_text_tokenizer(folder / "tokenizer.json")
    return build_model(args, state, device, dtype), tok, f"{model} ({fmt} format)"


# ---------------------------------------------------------------------------------------------
# The generator
# ---------------------------------------------------------------------------------------------


class Generator:
    """Upstream's Generator: text (+ context) -> 24 kHz audio, one plain frame loop."""

    def __init__(self, model: CSM, text_tokenizer, audio_tokenizer, device=None, watermarker=None,
                 watermark_key=None, max_batch_size: int = 1, tail: TailConfig | None = None,
                 normalize: bool = True, allow_cpu_fallback: bool = False):
        self._model = model
        self._text_tokenizer = text_tokenizer
        self._audio_tokenizer = audio_tokenizer
        self.device = torch.device(device) if device else next(model.parameters()).device
        self.sample_rate = SAMPLE_RATE
        self._watermarker = watermarker
        self._watermark_key = watermark_key
        self.tail = tail or TailConfig()  # runaway-output guard (runaway.py)
        self.normalize = normalize  # spell out numbers and symbols (normalize.py)
        self.allow_cpu_fallback = allow_cpu_fallback
        self.events: list[str] = []  # fallbacks and retries, as logged
        self.last_stop_reason = ""
        if model.max_batch_size < max_batch_size:
            model.setup_caches(max_batch_size)

    @property
    def model(self) -> CSM:
        return self._model

    @property
    def max_seq_len(self) -> int:
        return self._model.max_seq_len

    # -- prompt -------------------------------------------------------------------------------

    def prepare_text(self, text: str) -> str:
        return normalize_text(text) if self.normalize else text

    def note(self, event: str):
        """A fallback or retry: logged, and kept for the dashboard and the server's metrics."""
        log.warning(event)
        self.events.append(event)

    def _tokenize_text_segment(self, text: str, speaker: int):
        ids = self._text_tokenizer.encode(f"[{speaker}]{self.prepare_text(text)}").ids
        tokens = torch.zeros(len(ids), 33, dtype=torch.long)
        mask = torch.zeros(len(ids), 33, dtype=torch.bool)
        tokens[:, -1] = torch.tensor(ids)
        mask[:, -1] = True
        return tokens, mask

    @torch.inference_mode()
    def _tokenize_audio(self, audio: torch.Tensor):
        """24 kHz mono [samples] -> ([frames + 1, 33], mask): Mimi codes plus the all-zero EOS frame."""
        codes = self._audio_tokenizer.encode(audio.to(self.device)[None, None])[0]  # [32, T]
        return audio_prompt(codes.T.cpu())

    def _tokenize_segment(self, seg: Segment):
        t, tm = self._tokenize_text_segment(seg.text, seg.speaker)
        a, am = self._tokenize_audio(to_mono_24k(seg.audio, seg.sample_rate))
        return torch.cat([t, a]), torch.cat([tm, am])

    def build_prompt(self, req: GenerationRequest, reserve_frames: int | None = None, history=()):
        """-> (tokens [S, 33], mask [S, 33]) on device. Context that does not fit in the window
        beside the text and `reserve_frames` is dropped, oldest first, with a warning.

        history: prompt pieces (tokens, mask) said after `req.context` (the sentences of a long
        text already spoken), placed between the context and the text.
        """
        reserve = req.max_frames if reserve_frames is None else reserve_frames
        text_t, text_m = self._tokenize_text_segment(req.text, req.speaker)
        window = self.max_seq_len
        if len(text_t) + reserve > window:
            raise ValueError(
                f"text is too long: {len(text_t)} tokens + {reserve} frames of audio "
                f"(max_audio_length_ms={req.max_audio_length_ms:g}) exceed the {window}-position "
                "window; split the text or lower max_audio_length_ms")
        segs = [self._tokenize_segment(s) for s in req.context] + list(history)
        budget = window - reserve - len(text_t)
        kept = []
        for tokens, mask in reversed(segs):  # newest context first
            if len(tokens) > budget:
                break
            kept.insert(0, (tokens, mask))
            budget -= len(tokens)
        if len(kept) < len(segs):
            warnings.warn(f"context too long for the {window}-position window: dropped the "
                          f"{len(segs) - len(kept)} oldest of {len(segs)} segments", stacklevel=3)
        kept.append((text_t, text_m))
        tokens = torch.cat([t for t, _ in kept]).to(self.device)
        mask = torch.cat([m for _, m in kept]).to(self.device)
        return tokens, mask

    def sampling_state(self, req: GenerationRequest) -> SamplingState:
        s = SamplingState.empty(1, self.device)
        s.temperature.fill_(req.temperature)
        s.topk.fill_(min(req.topk, MIMI_CODES))
        s.seed.fill_(draw_seed(req.seed))
        return s

    # -- generation ---------------------------------------------------------------------------

    @torch.inference_mode()
    def generate_codes(self, text: str, speaker: int, context=(), max_audio_length_ms: float = 90_000,
                       temperature: float = 0.9, topk: int = 50, seed: int | None = None,
                       stop_at_eos: bool = True) -> torch.Tensor:
        """The generated Mimi codes [frames, 32] int64, before decoding (the end frame excluded)."""
        req = validate_request(text, speaker, context, max_audio_length_ms, temperature, topk, seed)
        frames = list(self._frames(req, stop_at_eos))
        if not frames:
            return torch.zeros(0, 32, dtype=torch.long)
        return torch.cat(frames).cpu()

    def _frames(self, req: GenerationRequest, stop_at_eos: bool = True, prompt=None):
        """The plain loop: yield each frame's codes [1, 32] (on device) until the end frame."""
        tokens, mask = prompt if prompt is not None else self.build_prompt(req)
        sampling = self.sampling_state(req)
        pos = torch.arange(tokens.shape[0], device=self.device)[None]
        tokens, mask = tokens[None], mask[None]
        for _ in range(req.max_frames):
            codes = self._model.generate_frame(tokens, mask, pos, sampling)  # [1, 32]
            sampling.frame += 1
            if stop_at_eos and bool(is_eos(codes)):
                return
            yield codes
            tokens = torch.cat([codes, torch.zeros_like(codes[:, :1])], dim=1)[:, None]
            mask = torch.ones_like(tokens, dtype=torch.bool)
            mask[..., -1] = False
            pos = pos[:, -1:] + 1

    @torch.inference_mode()
    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [frames, 32] -> audio [frames * 1920] float32 on the CPU (one-shot Mimi decode)."""
        if codes.shape[0] == 0:
            return torch.zeros(0)
        audio = self._audio_tokenizer.decode(codes.T[None].to(self.device))  # [1, 1, samples]
        return audio[0, 0].float().cpu()

    def generate(self, text: str, speaker: int, context=(), max_audio_length_ms: float = 90_000,
                 temperature: float = 0.9, topk: int = 50, seed: int | None = None) -> torch.Tensor:
        """Text -> 1-D float32 audio at `self.sample_rate` (24 kHz), watermarked when enabled.

        A runaway tail (silence, a stuck frame) stops the loop early and is trimmed; an output
        with no audio is retried with cooler sampling; out of device memory falls back to the
        CPU when `allow_cpu_fallback` is set.
        """
        req = validate_request(text, speaker, context, max_audio_length_ms, temperature, topk, seed)
        for attempt in range(MAX_EMPTY_RETRIES + 1):
            audio = self._with_cpu_fallback(lambda: self._speak(req))
            if audio.numel():
                return self._watermark(audio)
            if attempt < MAX_EMPTY_RETRIES:
                req, event = retry_request(req, attempt + 1)
                self.note(event)
        raise EmptyOutputError(MAX_EMPTY_RETRIES + 1)

    @torch.inference_mode()
    def _speak(self, req: GenerationRequest) -> torch.Tensor:
        """One try: the plain loop, decoded frame by frame in Mimi's streaming state, guarded."""
        guard = TailGuard(self.tail, self.sample_rate)
        pieces = []
        self.last_stop_reason = "max_audio_length_ms reached"
        prompt = self.build_prompt(req)  # context audio is encoded outside the streaming state
        with self._audio_tokenizer.streaming(1):
            n = 0
            for codes in self._frames(req, prompt=prompt):
                n += 1
                audio = self._audio_tokenizer.decode(codes[..., None])[0, 0].float().cpu()
                out, stop = guard.feed(codes.cpu(), audio)
                pieces.append(out)
                if stop:
                    self.last_stop_reason = f"runaway: {stop}"
                    break
            else:
                if n < req.max_frames:
                    self.last_stop_reason = "end of speech"
        audio = torch.cat(pieces) if pieces else torch.zeros(0)
        return guard.end(audio)

    def _with_cpu_fallback(self, fn):
        try:
            return fn()
        except torch.OutOfMemoryError:
            if not self.allow_cpu_fallback or self.device.type == "cpu":
                raise
            self.note(f"out of memory on {self.device}: falling back to the CPU (allow_cpu_fallback)")
            self.to_device(torch.device("cpu"))
            return fn()

    def to_device(self, device: torch.device):
        """Move the model and codec (float32 on the CPU); caches are rebuilt there."""
        dtype = torch.float32 if device.type == "cpu" else next(self._model.parameters()).dtype
        self._model.to(device=device, dtype=dtype)
        self._model.codebook_offsets = self._model.codebook_offsets.to(device)
        self._model.setup_caches(max(1, self._model.max_batch_size), self._model.max_seq_len)
        self._audio_tokenizer.to(device)
        self.device = device

    def _watermark(self, audio: torch.Tensor) -> torch.Tensor:
        if self._watermarker is None or audio.numel() == 0:
            return audio
        from watermarking import watermark

        return watermark(self._watermarker, audio, self.sample_rate, self._watermark_key)


def audio_prompt(codes: torch.Tensor):
    """Audio codes [n, 32] -> prompt rows ([n + 1, 33], mask): the codes, then the all-zero end
    frame; the text column unused. Encoded context and already-spoken segments both use it."""
    codes = torch.cat([codes, torch.zeros(1, codes.shape[1], dtype=codes.dtype)])
    tokens = torch.zeros(codes.shape[0], 33, dtype=torch.long)
    mask = torch.zeros(codes.shape[0], 33, dtype=torch.bool)
    tokens[:, :-1] = codes
    mask[:, :-1] = True
    return tokens, mask


def draw_seed(seed: int | None) -> int:
    """The 32-bit key of a request's random draws; None draws one from torch's global RNG."""
    if seed is None:
        return int(torch.randint(0, 2**32, (1,)).item())
    return seed & 0xFFFFFFFF


def load_csm_1b(device: str = "auto", model: str = DEFAULT_REPO, mimi: str | None = None,
                dtype: torch.dtype | None = None, watermark: bool = True, watermark_key=None,
                allow_cpu_fallback: bool = False, normalize: bool = True) -> Generator:
    """Load CSM-1B and Mimi and return a Generator.

    model: a hub repo id (default: the ungated copy; `sesame/csm-1b` for the official gated
    one), a local folder or weight file (both checkpoint formats), or `random:csm-1b` /
    `random:tiny` for random weights with no download. mimi: None (Kyutai's release), a local
    file, a repo id, or 'random' (the default for random models).
    """
    events = []
    try:
        dev = pick_device(device)
        csm, tok, _ = load_model_and_tokenizer(model, dev, dtype)
    except (RuntimeError, torch.OutOfMemoryError) as e:
        if isinstance(e, CheckpointError) or not allow_cpu_fallback or str(device) == "cpu":
            raise
        events.append(f"device '{device}' failed ({str(e)[:120]}): falling back to the CPU")
        log.warning(events[-1])
        dev = torch.device("cpu")
        csm, tok, _ = load_model_and_tokenizer(model, dev, None)
    if mimi is None and model.startswith("random:"):
        mimi = "random"
    audio_tokenizer = load_mimi(mimi, dev)
    wm, key = _load_watermark_stage(watermark, dev, watermark_key)
    gen = Generator(csm, tok, audio_tokenizer, dev, watermarker=wm, watermark_key=key,
                    normalize=normalize, allow_cpu_fallback=allow_cpu_fallback)
    gen.events.extend(events)
    return gen


def _load_watermark_stage(enabled: bool, device, key):
    if not enabled:
        warnings.warn("watermarking is off: the audio will not carry the CSM-1B watermark that "
                      "Sesame asks users to keep", UserWarning, stacklevel=3)
        return None, None
    from watermarking import load_watermarker, resolve_key

    return load_watermarker(device), resolve_key(key)
