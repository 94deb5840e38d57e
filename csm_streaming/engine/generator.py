"""The upstream-compatible API: Segment, load_csm_1b, Generator.generate.

`Generator` runs the plain eager loop, one frame at a time, like Sesame's release. It is also the
reference the streaming engine is tested against, so it stays simple on purpose. The prompt
pieces (text rows, encoded audio rows, fitting them into the window) are built by prompt_rows.py
for both.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from csm_streaming.audio import SAMPLE_RATE, to_mono_24k
from csm_streaming.engine.normalize import normalize_text
from csm_streaming.engine.prompt_rows import audio_rows, encode_slices, fit_prompt, text_rows
from csm_streaming.engine.runaway import TailConfig, TailGuard
from csm_streaming.metrics import DEVICE_FALLBACK, EMPTY_RETRY, Event
from csm_streaming.model.checkpoints import default_dtype, load_mimi, load_model_and_tokenizer
from csm_streaming.model.csm import CSM
from csm_streaming.model.hub import DEFAULT_REPO, CheckpointError, is_random_model
from csm_streaming.model.sampling import MIMI_CODES, SamplingState, candidates_for, is_eos
from csm_streaming.request import (
    DEFAULT_MAX_AUDIO_MS,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_K,
    MAX_EMPTY_RETRIES,
    EmptyOutputError,
    GenerationRequest,
    SamplingParams,
    Segment,
    draw_seed,
    retry_request,
)

log = logging.getLogger("csm")

RANDOM_MODEL_MAX_AUDIO_MS = 3_000  # random weights never say "end": keep their default short


def sampling_for(params: SamplingParams, seed: int, device) -> SamplingState:
    s = SamplingState.empty(1, device)
    s.temperature.fill_(params.temperature)
    s.top_k.fill_(min(params.top_k, MIMI_CODES))
    s.candidates = candidates_for(params.top_k)
    s.seed.fill_(seed)
    return s


@dataclass(frozen=True)
class LoadOptions:
    """How `load_csm_1b` loads CSM-1B, and what the Generator it returns does by default.

    model: a hub repo id (default: the ungated copy; `sesame/csm-1b` for the official gated
    one), a local folder or weight file (both checkpoint formats), or `random:csm-1b` /
    `random:tiny` for random weights with no download. mimi: None (Kyutai's release), a local
    file, a repo id, or 'random' (the default for random models). Random models also get a
    watermark model with random weights (the stage runs, the mark means nothing; random:tiny's
    is small, as its model is) and a short default length (RANDOM_MODEL_MAX_AUDIO_MS): they
    never emit the end frame. quantize: None, 'int8' (CPU, MPS, CUDA) or 'int4' (CPU)
    weight-only quantization, see model/quantize.py; dtype='int8' / 'int4' says the same.
    dtype: a torch.dtype, 'fp32', 'bf16', or 'auto' (on a CPU the fastest of the two, and of
    int8 when quantize='int8' was asked for, measured: see pick_dtype); None: bf16 on CUDA,
    fp32 elsewhere.
    """

    model: str = DEFAULT_REPO
    mimi: str | None = None
    dtype: torch.dtype | str | None = None
    quantize: str | None = None
    watermark: bool = True
    watermark_key: object = None
    allow_cpu_fallback: bool = False
    normalize: bool = True  # spell out numbers and symbols (normalize.py)

    @property
    def default_max_audio_ms(self) -> float:
        """Random weights never say "end": their default length is short."""
        return RANDOM_MODEL_MAX_AUDIO_MS if is_random_model(self.model) else DEFAULT_MAX_AUDIO_MS


# ---------------------------------------------------------------------------------------------
# The generator
# ---------------------------------------------------------------------------------------------


class Generator:
    """Upstream's Generator: text (+ context) -> 24 kHz audio, one plain frame loop.

    It owns a batch-1 set of KV caches; the streaming engines on the same model own theirs.
    """

    def __init__(self, model: CSM, text_tokenizer, audio_tokenizer, device=None, watermarker=None,
                 options: LoadOptions | None = None):
        options = options or LoadOptions()
        self._model = model
        self.text_tokenizer = text_tokenizer
        self.mimi = audio_tokenizer
        self.device = torch.device(device) if device else next(model.parameters()).device
        self.sample_rate = SAMPLE_RATE
        self.watermarker = watermarker  # watermarking.Watermarker, or None (explicitly off)
        self.tail = TailConfig()  # runaway-output guard (runaway.py)
        self.normalize = options.normalize
        self.allow_cpu_fallback = options.allow_cpu_fallback
        self.default_max_audio_ms = options.default_max_audio_ms
        self.events: list[Event] = []  # fallbacks and retries, as logged
        self.last_stop_reason = ""
        self.caches = model.make_caches(1)

    @property
    def model(self) -> CSM:
        return self._model

    @property
    def max_seq_len(self) -> int:
        return self.caches.max_seq

    def note(self, kind: str, text: str) -> Event:
        """A fallback or retry: logged, and kept for the dashboard and the server's metrics."""
        log.warning(text)
        event = Event(kind, text)
        self.events.append(event)
        return event

    def complete(self, req: GenerationRequest) -> GenerationRequest:
        """The request with this generator's default length where it left it to the default."""
        return req.with_default_length(self.default_max_audio_ms)

    def upstream_request(self, text, speaker, context, max_audio_length_ms, temperature, topk,
                         seed) -> GenerationRequest:
        """Upstream's positional arguments (topk spelled as upstream spells it) -> the request.
        Only the upstream-compatible faces call it."""
        return self.complete(GenerationRequest(text, speaker, context, SamplingParams(
            temperature, topk, seed, max_audio_length_ms)))

    # -- prompt -------------------------------------------------------------------------------

    def prepare_text(self, text: str) -> str:
        return normalize_text(text) if self.normalize else text

    def tokenize_text(self, text: str, speaker: int):
        """The rows of a text segment (normalised first unless turned off)."""
        return text_rows(self.text_tokenizer, self.prepare_text(text), speaker)

    @torch.inference_mode()
    def encode_audio(self, audio: torch.Tensor) -> torch.Tensor:
        """24 kHz mono audio [samples] -> Mimi codes [frames, 32] (CPU)."""
        pieces = list(encode_slices(self.mimi, audio, self.device))
        return torch.cat(pieces) if pieces else torch.zeros(0, 32, dtype=torch.long)

    def segment_rows(self, seg: Segment, codes: torch.Tensor | None = None):
        """A context turn -> its rows: text, then audio (given codes, the segment's own codes,
        or its audio encoded now); a text-only turn has no audio rows."""
        t, m = self.tokenize_text(seg.text, seg.speaker)
        if codes is None and seg.codes is not None:
            codes = torch.as_tensor(seg.codes).long()
        if codes is None and seg.audio is not None:
            codes = self.encode_audio(to_mono_24k(seg.audio, seg.sample_rate))
        if codes is None:
            return t, m
        a, am = audio_rows(codes)
        return torch.cat([t, a]), torch.cat([m, am])

    def build_prompt(self, req: GenerationRequest, reserve_frames: int | None = None):
        """-> (tokens [S, 33], mask [S, 33]) on device. Context that does not fit in the window
        beside the text and `reserve_frames` is dropped, oldest first, with a warning."""
        reserve = req.max_frames if reserve_frames is None else reserve_frames
        text = self.tokenize_text(req.text, req.speaker)
        if len(text[0]) + reserve > self.max_seq_len:  # before encoding any context audio
            fit_prompt([], text, self.max_seq_len, reserve)
        pieces = [self.segment_rows(s) for s in req.context]
        tokens, mask = fit_prompt(pieces, text, self.max_seq_len, reserve)
        return tokens.to(self.device), mask.to(self.device)

    # -- generation ---------------------------------------------------------------------------

    @torch.inference_mode()
    def generate_codes(self, text: str, speaker: int = 0, context=(),
                       max_audio_length_ms: float | None = None,
                       temperature: float = DEFAULT_TEMPERATURE, topk: int = DEFAULT_TOP_K,
                       seed: int | None = None, *, stop_at_eos: bool = True) -> torch.Tensor:
        """The generated Mimi codes [frames, 32] int64, before decoding (the end frame excluded)."""
        req = self.upstream_request(text, speaker, context, max_audio_length_ms, temperature,
                                    topk, seed)
        frames = list(self._frames(req, stop_at_eos))
        return torch.cat(frames).cpu() if frames else torch.zeros(0, 32, dtype=torch.long)

    def _frames(self, req: GenerationRequest, stop_at_eos: bool = True, prompt=None):
        """The plain loop: yield each frame's codes [1, 32] (on device) until the end frame."""
        tokens, mask = prompt if prompt is not None else self.build_prompt(req)
        sampling = sampling_for(req.sampling, draw_seed(req.sampling.seed), self.device)
        m, caches = self._model, self.caches
        h = m.prefill(tokens[None], mask[None], caches, slot=0)
        pos = torch.tensor([[tokens.shape[0]]], device=self.device)
        codes = m.sample_frame(h, sampling, caches, slot=0)
        for i in range(req.max_frames):
            if i:
                row = torch.cat([codes, torch.zeros_like(codes[:, :1])], dim=1)[:, None]
                row_mask = torch.ones_like(row, dtype=torch.bool)
                row_mask[..., -1] = False
                codes = m.generate_frame(row, row_mask, pos, sampling, caches)  # [1, 32]
                pos = pos + 1
            sampling.frame += 1
            if stop_at_eos and bool(is_eos(codes)):
                return
            yield codes

    @torch.inference_mode()
    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [frames, 32] -> audio [frames * 1920] float32 on the CPU (one-shot Mimi decode)."""
        if codes.shape[0] == 0:
            return torch.zeros(0)
        audio = self.mimi.decode(codes.T[None].to(self.device))  # [1, 1, samples]
        return audio[0, 0].float().cpu()

    def generate(self, text: str, speaker: int = 0, context=(),
                 max_audio_length_ms: float | None = None,
                 temperature: float = DEFAULT_TEMPERATURE, topk: int = DEFAULT_TOP_K,
                 seed: int | None = None) -> torch.Tensor:
        """Text -> 1-D float32 audio at `self.sample_rate` (24 kHz), watermarked when enabled.

        A runaway tail (silence, a stuck frame) stops the loop early and is trimmed; an output
        with no audio is retried with cooler sampling; out of device memory falls back to the
        CPU when `allow_cpu_fallback` is set.
        """
        return self.speak(self.upstream_request(text, speaker, context, max_audio_length_ms,
                                                temperature, topk, seed))

    def speak(self, req: GenerationRequest) -> torch.Tensor:
        """`generate` for a request object."""
        req = self.complete(req)
        for attempt in range(MAX_EMPTY_RETRIES + 1):
            audio = self._with_cpu_fallback(self._speak, req)
            if audio.numel():
                return self.watermarker.mark(audio) if self.watermarker else audio
            if attempt < MAX_EMPTY_RETRIES:
                req, text = retry_request(req, attempt + 1)
                self.note(EMPTY_RETRY, text)
        raise EmptyOutputError(MAX_EMPTY_RETRIES + 1)

    @torch.inference_mode()
    def _speak(self, req: GenerationRequest) -> torch.Tensor:
        """One try: the plain loop, decoded frame by frame in Mimi's streaming state, guarded."""
        guard = TailGuard(self.tail, self.sample_rate)
        pieces = []
        self.last_stop_reason = "max_audio_length_ms reached"
        prompt = self.build_prompt(req)  # context audio is encoded outside the streaming state
        with self.mimi.streaming(1):
            n = 0
            for codes in self._frames(req, prompt=prompt):
                n += 1
                audio = self.mimi.decode(codes[..., None])[0, 0].float().cpu()
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

    def _with_cpu_fallback(self, fn, *args):
        try:
            return fn(*args)
        except torch.OutOfMemoryError:
            if not self.allow_cpu_fallback or self.device.type == "cpu":
                raise
            self.fall_back_to_cpu()
            return fn(*args)

    def fall_back_to_cpu(self):
        """Out of device memory: move the model and codec to the CPU (float32), said once."""
        self.note(DEVICE_FALLBACK, f"out of memory on {self.device}: falling back to the CPU "
                                   "(allow_cpu_fallback)")
        self.to_device(torch.device("cpu"))

    def to_device(self, device: torch.device):
        """Move the model and codec (float32 on the CPU); this generator's caches are rebuilt
        there. Engines on this model must be rebuilt too (StreamingGenerator does)."""
        dtype = torch.float32 if device.type == "cpu" else next(self._model.parameters()).dtype
        self._model.to(device=device, dtype=dtype)
        self.caches = self._model.make_caches(1, self.caches.max_seq)
        self.mimi.to(device)
        self.device = device


def load_csm_1b(device: str = "auto", model: str = DEFAULT_REPO, **options) -> Generator:
    """Load CSM-1B and Mimi and return a Generator. options: the fields of LoadOptions (mimi,
    dtype, quantize, watermark, watermark_key, allow_cpu_fallback, normalize)."""
    return load_generator(device, LoadOptions(model=model, **options))


def load_generator(device: str, opts: LoadOptions) -> Generator:
    """load_csm_1b with its options as one object (see LoadOptions)."""
    from csm_streaming.model.quantize import MODES, check_mode, quantize_model
    from csm_streaming.model.watermark import load_watermark_stage

    dtype, quantize = opts.dtype, opts.quantize
    if isinstance(dtype, str):
        if dtype not in (*MODES, *DTYPE_NAMES, "auto"):
            raise ValueError(f"dtype: a torch.dtype, or one of {', '.join(DTYPE_NAMES)}, auto, "
                             f"{', '.join(MODES)} (got {dtype!r})")
        if dtype in MODES:
            dtype, quantize = None, dtype
        else:
            dtype = DTYPE_NAMES.get(dtype, dtype)

    random_model = is_random_model(opts.model)
    events = []
    try:
        dev = pick_device(device)
        if dtype == "auto":
            dtype, quantize = pick_dtype(dev, quantize)
        check_mode(quantize, dev)  # before the weights load: int4 on a GPU says so now
        csm, tok, _ = load_model_and_tokenizer(opts.model, dev, dtype)
    except (RuntimeError, torch.OutOfMemoryError) as e:
        if isinstance(e, CheckpointError) or not opts.allow_cpu_fallback or str(device) == "cpu":
            raise
        events.append(Event(DEVICE_FALLBACK, f"device '{device}' failed ({e}): falling back to "
                                             "the CPU"))
        log.warning(events[-1].text)
        dev = torch.device("cpu")
        csm, tok, _ = load_model_and_tokenizer(opts.model, dev, None)
    if quantize:
        log.info("%s weights: %d Linear layers quantized", quantize, quantize_model(csm, quantize))
    mimi = "random" if opts.mimi is None and random_model else opts.mimi
    audio_tokenizer = load_mimi(mimi, dev)
    wm = load_watermark_stage(opts.watermark, dev, opts.watermark_key,
                              random_weights=random_model, small=opts.model == "random:tiny")
    gen = Generator(csm, tok, audio_tokenizer, dev, watermarker=wm, options=opts)
    gen.events.extend(events)
    return gen


DTYPE_NAMES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def pick_dtype(device: torch.device, quantize: str | None = None
               ) -> tuple[torch.dtype, str | None]:
    """dtype="auto" -> (dtype, quantize): bf16 on CUDA; on a CPU the fastest of fp32, bf16 and,
    when int8 was asked for, int8 weights (with each int8 kernel this CPU has: capped at AVX2,
    oneDNN's ran 8x slower than FBGEMM's), for CSM-1B's largest product (8192x2048 at batch 1),
    measured here: bf16 reads half the bytes but is slower than fp32 on CPUs without AVX-512
    BF16 or AMX, and int8 has no fast kernel on some CPUs (ARM). Says what it picked and why."""
    if device.type != "cpu":
        return default_dtype(device), quantize
    from csm_streaming.model.cpu_kernels import time_in_turns
    from csm_streaming.model.quantize import Int8Linear, int8_cpu_kernels

    w32, x = torch.randn(8192, 2048) * 0.02, torch.randn(1, 1, 2048)
    pairs = {name: (w32.to(dtype), x.to(dtype)) for name, dtype in DTYPE_NAMES.items()}
    candidates = {name: lambda w=w, xi=xi: torch.nn.functional.linear(xi, w)
                  for name, (w, xi) in pairs.items()}
    if quantize == "int8":
        for kernel in int8_cpu_kernels():
            layer = Int8Linear(w32)
            layer.use_cpu_kernel(kernel)
            candidates[f"int8 ({kernel})"] = lambda layer=layer: layer(x)
    times = {name: s * 1000 for name, s in time_in_turns(candidates).items()}
    best = min(times, key=times.get).split(" ")[0]  # int8 with whichever kernel was faster
    said = ", ".join(f"{k} {v:.2f} ms" for k, v in times.items())
    if quantize == "int8" and best != "int8":
        log.warning("dtype auto: %s on this CPU; int8 was asked for but is slower here (%s for "
                    "an 8192x2048 product): the weights stay %s", best, said, best)
        return DTYPE_NAMES[best], None
    log.info("dtype auto: %s on this CPU (%s for an 8192x2048 product)", best, said)
    return (torch.float32, "int8") if best == "int8" else (DTYPE_NAMES[best], quantize)


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
