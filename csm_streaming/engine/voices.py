"""Named voices: a reference clip, what it says, and a speaker id, kept as CSM context.

A speaker id alone does not keep a voice: CSM imitates the voice of its context. A voice is a
folder entry:

    voices/NAME.wav    the clip (any rate, mono or stereo; a second to a minute)
    voices/NAME.txt    its transcript
    voices/NAME.json   optional: {"speaker": 0}

`VoiceLibrary.load(folder, generator)` reads every voice and Mimi-encodes its clip once, so a
request that names the voice costs no encoding; a voice whose files are unusable is skipped and
named in `skipped`, the others work. `add` and `remove` change the library and the folder at
once (the server's voices API). No recordings ship with the project.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from csm_streaming.audio import SAMPLE_RATE, AudioLimits, read_audio, wav_bytes
from csm_streaming.request import MAX_SPEAKER, Segment

log = logging.getLogger("csm.voices")

DEFAULT_VOICES_DIR = "voices"
MIN_VOICE_SECONDS, MAX_VOICE_SECONDS = 1.0, 60.0  # a clip in the folder (the operator's)
# over HTTP (anyone with the token): CSM takes a few to a few tens of seconds of a voice as
# context, longer clips only cost the server time
MAX_UPLOAD_SECONDS = 30.0
MAX_VOICES = 64  # in one library (a folder)
MAX_TRANSCRIPT_CHARS = 1000
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,63}")
# names no file may have on Windows (a voices folder may be copied there), any case
RESERVED_NAMES = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)),
                  *(f"lpt{i}" for i in range(10))}
NAME_RULE = ("1 to 64 letters, digits, '_' or '-', not starting with '-', and not a reserved "
             "device name (CON, NUL, COM1...)")


class VoiceError(ValueError):
    """A voice is missing or unusable; the message names it and says what to do."""


class UnknownVoice(VoiceError):
    """No voice of that name."""


class VoiceExists(VoiceError):
    """A voice of that name is there already."""


@dataclass(frozen=True)
class Voice:
    name: str
    speaker: int
    text: str
    segment: Segment  # its clip as context, encoded (codes set) once the library is loaded

    @property
    def seconds(self) -> float | None:
        seg = self.segment
        if seg.codes is not None:
            return len(seg.codes) * 0.08
        return None if seg.audio is None else len(seg.audio) / seg.sample_rate


class VoiceLibrary:
    def __init__(self, voices: dict[str, Voice], folder: Path | None,
                 skipped: dict[str, str] | None = None):
        self._voices, self.folder = dict(voices), folder
        self.skipped = dict(skipped or {})  # file -> why it was not loaded
        self._lock = threading.Lock()  # add/remove: one at a time, the folder kept in step

    @classmethod
    def load(cls, folder, generator=None, must_exist: bool = False) -> VoiceLibrary:
        """Every NAME.wav with its NAME.txt in `folder`; an unusable one is skipped (named in
        `skipped`). No folder: an empty library, or a VoiceError naming it when `must_exist`
        (a folder the user asked for). generator: encodes each clip now; None leaves the audio."""
        folder = Path(folder).expanduser()
        if not folder.is_dir():
            if must_exist:
                check_folder(folder)
            return cls({}, folder)
        voices, skipped = {}, {}
        for wav in sorted(folder.glob("*.wav")):
            try:
                voices[wav.stem] = _encoded(read_voice(wav), generator)
            except (VoiceError, OSError, ValueError) as e:
                skipped[wav.name] = str(e)
                log.warning("voice %s skipped: %s", wav.name, e)  # server, replicas, CLI alike
        return cls(voices, folder, skipped)

    def names(self) -> list[str]:
        return sorted(self._voices)

    def voices(self) -> list[Voice]:
        return [self._voices[n] for n in self.names()]

    def has(self, name: str) -> bool:
        return name in self._voices

    def get(self, name: str) -> Voice:
        if f"{name}.wav" in self.skipped:  # it is there, but unusable: say why
            raise VoiceError(self.skipped[f"{name}.wav"])
        if name not in self._voices:
            known = ", ".join(self.names()) or f"none: add NAME.wav and NAME.txt to {self.folder}"
            raise UnknownVoice(f"no voice named {name!r} (voices: {known})")
        return self._voices[name]

    def add(self, name: str, text: str, audio, sample_rate: int, speaker: int = 0,
            generator=None) -> Voice:
        """A new voice from a clip (any rate; channels averaged), usable at once and written to
        the folder (it is there after a restart). Raises VoiceError saying what to change."""
        check_name(name)
        text = " ".join(str(text).split())
        if not text:
            raise VoiceError("text: the transcript of the clip is empty: send what it says")
        if len(text) > MAX_TRANSCRIPT_CHARS:
            raise VoiceError(f"text: {len(text)} characters; the limit is {MAX_TRANSCRIPT_CHARS}")
        if not is_speaker(speaker):
            raise VoiceError(f"speaker: an integer 0..{MAX_SPEAKER}")
        from csm_streaming.audio import to_mono_24k

        clip = to_mono_24k(audio, sample_rate)
        seconds = len(clip) / SAMPLE_RATE
        if not MIN_VOICE_SECONDS <= seconds <= MAX_VOICE_SECONDS:
            raise VoiceError(f"audio: {seconds:.1f} s; a voice's clip is {MIN_VOICE_SECONDS:g} to "
                             f"{MAX_VOICE_SECONDS:g} s of one person speaking")
        if float(np.abs(clip.numpy()).max()) < 1e-4:
            raise VoiceError("audio: the clip is silent")
        if self.folder is None:
            raise VoiceError("this library has no folder to keep voices in")
        with self._lock:  # also the encoder's: its streaming state is one at a time
            if name in self._voices:
                raise VoiceExists(f"a voice named {name!r} exists: delete it first, or pick "
                                  "another name")
            if len(self._voices) >= MAX_VOICES:
                raise VoiceExists(f"this server keeps at most {MAX_VOICES} voices: delete one "
                                  "first")
            voice = _encoded(Voice(name, speaker, text, Segment(speaker, text, clip)), generator)
            self.folder.mkdir(parents=True, exist_ok=True)
            _write(self.folder / f"{name}.txt", text.encode() + b"\n")
            _write(self.folder / f"{name}.json", json.dumps({"speaker": speaker}).encode())
            _write(self.folder / f"{name}.wav", wav_bytes(clip))  # last: it makes the voice
            self._voices = {**self._voices, name: voice}
            self.skipped.pop(f"{name}.wav", None)  # a bad file of that name is replaced
        return voice

    def remove(self, name: str) -> None:
        """Forget a voice and delete its files (an unusable one's too: that is how it goes)."""
        with self._lock:
            if self.skipped.pop(f"{name}.wav", None) is None:
                self.get(name)  # UnknownVoice when there is none
            self._voices = {k: v for k, v in self._voices.items() if k != name}
            for ext in (".wav", ".txt", ".json"):  # the clip first: a half-deleted voice is none
                (self.folder / f"{name}{ext}").unlink(missing_ok=True)


def is_speaker(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and 0 <= value <= MAX_SPEAKER


def check_folder(folder) -> Path:
    """The voices folder a user named: it must exist (a typo must not mean "no voices")."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise VoiceError(f"voices folder {folder} does not exist: create it (voices are "
                         "NAME.wav + NAME.txt), or leave --voices-dir out")
    return folder


def check_name(name) -> None:
    if not isinstance(name, str) or not _NAME.fullmatch(name) \
            or name.lower() in RESERVED_NAMES:
        raise VoiceError(f"name: {name!r} is not a voice name: use {NAME_RULE} (no path)")


def _write(path: Path, data: bytes) -> None:
    """Whole or not at all: a crash never leaves half a file under the real name."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _encoded(voice: Voice, generator) -> Voice:
    if generator is None:
        return voice
    from csm_streaming.audio import to_mono_24k

    seg = voice.segment
    codes = generator.encode_audio(to_mono_24k(seg.audio, seg.sample_rate))
    return Voice(voice.name, voice.speaker, voice.text,
                 Segment(voice.speaker, voice.text, codes=codes))


def read_voice(wav: Path) -> Voice:
    name = wav.stem
    if not _NAME.fullmatch(name):
        raise VoiceError(f"{wav}: a voice's name is {NAME_RULE}")
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
        if not is_speaker(speaker):
            raise VoiceError(f"{meta}: speaker must be an integer 0..{MAX_SPEAKER}")
    audio, rate = read_audio(wav, mono=True, limits=AudioLimits(max_seconds=MAX_VOICE_SECONDS))
    if audio.size == 0:
        raise VoiceError(f"{wav}: the clip is empty")
    text = " ".join(txt.read_text(encoding="utf-8").split())
    return Voice(name, speaker, text, Segment(speaker, text, audio, rate))
