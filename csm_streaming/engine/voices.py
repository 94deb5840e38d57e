"""Named voices: a reference clip, what it says, and a speaker id, kept as CSM context.

A speaker id alone does not keep a voice: CSM imitates the voice of its context. A voice is a
folder entry:

    voices/NAME.wav    the clip (any rate, mono or stereo; a few seconds to half a minute)
    voices/NAME.txt    its transcript
    voices/NAME.json   optional: {"speaker": 0}

`VoiceLibrary.load(folder, generator)` reads every voice and Mimi-encodes its clip once, so a
request that names the voice costs no encoding. No recordings ship with the project.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from csm_streaming.audio import AudioLimits, read_audio
from csm_streaming.request import Segment

MAX_VOICE_SECONDS = 60.0
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


class VoiceError(ValueError):
    """A voice file is missing or unusable; the message names the file."""


@dataclass(frozen=True)
class Voice:
    name: str
    speaker: int
    text: str
    segment: Segment  # its clip as context, encoded (codes set) once the library is loaded


class VoiceLibrary:
    def __init__(self, voices: dict[str, Voice], folder: Path):
        self._voices, self.folder = voices, folder

    @classmethod
    def load(cls, folder, generator=None) -> VoiceLibrary:
        """Every NAME.wav with its NAME.txt in `folder` (an empty library when there is no
        folder). generator: encodes each clip now (a Generator); None leaves the audio."""
        folder = Path(folder).expanduser()
        voices = {}
        for wav in sorted(folder.glob("*.wav")) if folder.is_dir() else []:
            voice = read_voice(wav)
            if generator is not None:
                from csm_streaming.audio import to_mono_24k

                seg = voice.segment
                codes = generator.encode_audio(to_mono_24k(seg.audio, seg.sample_rate))
                voice = Voice(voice.name, voice.speaker, voice.text,
                              Segment(voice.speaker, voice.text, codes=codes))
            voices[voice.name] = voice
        return cls(voices, folder)

    def names(self) -> list[str]:
        return sorted(self._voices)

    def has(self, name: str) -> bool:
        return name in self._voices

    def get(self, name: str) -> Voice:
        if name not in self._voices:
            known = ", ".join(self.names()) or f"none: add NAME.wav and NAME.txt to {self.folder}"
            raise VoiceError(f"no voice named {name!r} (voices: {known})")
        return self._voices[name]


def read_voice(wav: Path) -> Voice:
    name = wav.stem
    if not _NAME.fullmatch(name):
        raise VoiceError(f"{wav}: a voice's name is letters, digits, '_' or '-'")
    txt = wav.with_suffix(".txt")
    if not txt.is_file() or not txt.read_text(encoding="utf-8").strip():
        raise VoiceError(f"{wav}: its transcript {txt.name} is missing or empty")
    speaker = 0
    meta = wav.with_suffix(".json")
    if meta.is_file():
        try:
            speaker = json.loads(meta.read_text())["speaker"]
        except (ValueError, KeyError, TypeError) as e:
            raise VoiceError(f'{meta}: expected {{"speaker": N}} ({e})') from None
        if isinstance(speaker, bool) or not isinstance(speaker, int) or speaker < 0:
            raise VoiceError(f"{meta}: speaker must be an integer >= 0")
    audio, rate = read_audio(wav, mono=True, limits=AudioLimits(max_seconds=MAX_VOICE_SECONDS))
    if audio.size == 0:
        raise VoiceError(f"{wav}: the clip is empty")
    text = " ".join(txt.read_text(encoding="utf-8").split())
    return Voice(name, speaker, text, Segment(speaker, text, audio, rate))
