"""The plain reference loop, with upstream's API: Generator.generate (loader.py loads it).

`Generator` runs the plain eager loop, one frame at a time, like Sesame's release. It is also the
reference the streaming engine is tested against, so it stays simple on purpose. The prompt
pieces (text rows, encoded audio rows, fitting them into the window) are built by prompt_rows.py
for both.
"""

from __future__ import annotations

import logging

import torch

from csm_streaming.audio import SAMPLE_RATE, to_mono_24k
from csm_streaming.engine.config import LoadOptions
from csm_streaming.engine.normalize import normalize_text
from csm_streaming.engine.prompt_rows import audio_rows, encode_slices, fit_prompt, text_rows
from csm_streaming.engine.runaway import TailConfig, TailGuard
from csm_streaming.metrics import DEVICE_FALLBACK, EMPTY_RETRY, Event
from csm_streaming.model.csm import CSM
from csm_streaming.model.sampling import MIMI_CODES, SamplingState, candidates_for, is_eos
from csm_streaming.request import (
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

def sampling_for(params: SamplingParams, seed: int, device) -> SamplingState:
    s = SamplingState.empty(1, device)
    s.temperature.fill_(params.temperature)
    s.top_k.fill_(min(params.top_k, MIMI_CODES))
    s.candidates = candidates_for(params.top_k)
    s.seed.fill_(seed)
    return s


class Generator:
    """Upstream's Generator: text (+ context) -> 24 kHz audio, one plain frame loop.

    It owns a batch-1 set of KV caches (made at its first use); the streaming engines on the
    same model own theirs.
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
        self._caches = None  # made by the first generate: see caches

    @property
    def model(self) -> CSM:
        return self._model

    @property
    def caches(self):
        """This generator's batch-1 KV caches, made when first needed: a process that only
        streams (its engines own theirs) never holds them (0.13 GB for CSM-1B in fp32)."""
        if self._caches is None:
            self._caches = self._model.make_caches(1)
        return self._caches

    @property
    def max_seq_len(self) -> int:
        return self._model.window

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
        self._caches = None  # made again, there, when next needed
        self.mimi.to(device)
        self.device = device
