"""Runaway output: stop a stream that goes on after speech has ended, and trim its tail.

Upstream users see long near-silent tails that run to the length limit (csm#122) and streams
stuck repeating one frame. `TailGuard` watches a stream frame by frame (80 ms):

- a frame is *silent* when its RMS is under `silence_dbfs`;
- after speech, silent frames past the first `keep_tail_ms` are held back: released when speech
  comes again (a pause), dropped when the stream ends (the tail is trimmed);
- `max_silence_ms` of silence after speech, or the same 32 codes `max_repeat_frames` times in a
  row, stops the stream early;
- a stream that stops on sound fades out over `fade_ms` instead of ending with a click.

Only silent frames are ever dropped: trimming never removes non-silent audio. No torch model
work here: it sees codes and decoded audio.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from csm_streaming.audio import FRAME_MS, FRAME_SAMPLES, SAMPLE_RATE


@dataclass(frozen=True)
class TailConfig:
    enabled: bool = True
    silence_dbfs: float = -50.0
    max_silence_ms: int = 2000
    keep_tail_ms: int = 400
    max_repeat_frames: int = 25
    fade_ms: int = 20

    def __post_init__(self):
        if self.max_silence_ms < FRAME_MS or self.keep_tail_ms < 0 or self.max_repeat_frames < 2:
            raise ValueError("TailConfig: max_silence_ms >= 80, keep_tail_ms >= 0, "
                             "max_repeat_frames >= 2")
        if self.keep_tail_ms >= self.max_silence_ms:
            raise ValueError("TailConfig: keep_tail_ms must be shorter than max_silence_ms")


def frame_dbfs(audio: torch.Tensor) -> torch.Tensor:
    """audio [n * 1920] -> RMS of each 80 ms frame in dBFS [n]."""
    frames = audio[: audio.numel() // FRAME_SAMPLES * FRAME_SAMPLES].view(-1, FRAME_SAMPLES).float()
    rms = frames.pow(2).mean(dim=1).sqrt()
    return 20 * torch.log10(rms.clamp(min=1e-10))


class TailGuard:
    def __init__(self, config: TailConfig = TailConfig(), sample_rate: int = SAMPLE_RATE):
        self.cfg = config
        self.sample_rate = sample_rate
        self.keep_frames = config.keep_tail_ms // FRAME_MS
        self.max_silent = config.max_silence_ms // FRAME_MS
        self.heard_speech = False
        self.silent_run = 0
        self.repeat_run = 0
        self.last_codes: torch.Tensor | None = None
        self.held: list[torch.Tensor] = []
        self.stop_reason: str | None = None
        self.trimmed_frames = 0

    def feed(self, codes: torch.Tensor, audio: torch.Tensor):
        """codes [n, 32], audio [n * 1920] of the next frames -> (audio to send now, stop reason).

        Once a stop reason is returned the stream must end (call `end`); later frames are not sent.
        """
        if not self.cfg.enabled:
            return audio, None
        out: list[torch.Tensor] = []
        loud = (frame_dbfs(audio) >= self.cfg.silence_dbfs if audio.numel()
                else torch.zeros(0, dtype=torch.bool))
        for i in range(codes.shape[0]):
            frame = audio[i * FRAME_SAMPLES:(i + 1) * FRAME_SAMPLES]
            same = self.last_codes is not None and torch.equal(codes[i], self.last_codes)
            self.repeat_run = self.repeat_run + 1 if same else 0
            self.last_codes = codes[i]
            if bool(loud[i]):
                out.extend(self.held)  # a pause, not the end: what was held goes out
                self.held = []
                out.append(frame)
                self.heard_speech = True
                self.silent_run = 0
            else:
                self.silent_run += 1
                if self.heard_speech and self.silent_run > self.keep_frames:
                    self.held.append(frame)
                else:
                    out.append(frame)
            if self.heard_speech and self.silent_run >= self.max_silent:
                self.stop_reason = f"silence after speech ({self.cfg.max_silence_ms} ms)"
            elif self.repeat_run + 1 >= self.cfg.max_repeat_frames:
                self.stop_reason = f"the same frame {self.cfg.max_repeat_frames} times"
            if self.stop_reason:
                break
        return (torch.cat(out) if out else audio[:0]), self.stop_reason

    def end(self, last: torch.Tensor) -> torch.Tensor:
        """The stream ends and `last` is the last audio it sends: drop the held silence (the
        trimmed tail) and fade `last` out if it ends on sound."""
        self.trimmed_frames += len(self.held)
        self.held = []
        if not self.cfg.enabled or last.numel() < FRAME_SAMPLES:
            return last
        if float(frame_dbfs(last[-FRAME_SAMPLES:])[0]) < self.cfg.silence_dbfs:
            return last
        n = min(last.numel(), int(self.cfg.fade_ms * self.sample_rate / 1000))
        ramp = 0.5 * (1 + torch.cos(torch.linspace(0, math.pi, n)))
        last = last.clone()
        last[-n:] *= ramp
        return last
