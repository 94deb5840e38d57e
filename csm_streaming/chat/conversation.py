"""Talk to it: a language model writes the reply, CSM speaks it while it is being written.

    conv = Conversation(load_streaming_csm_1b(), LLMConfig.from_env(), voice=voices.get("anna"))
    for chunk in conv.speak_reply("What's the weather like on Mars?"):
        ...  # audio starts after the reply's first clause, not after the whole reply

The dialogue is kept as CSM context: the voice's clip first (always kept), then every user turn
(text) and every spoken reply (its text and the exact codes CSM generated), so the voice stays
the same from turn to turn. The oldest turns go first when the window fills.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import torch

from csm_streaming.chat.llm import LLMConfig, LLMError, stream_reply
from csm_streaming.engine.segmenting import TextChunker
from csm_streaming.engine.text_feed import TextFeed
from csm_streaming.request import GenerationRequest, SamplingParams, Segment

CONTEXT_SHARE = 0.5  # of the window for the dialogue; the rest is for the reply being spoken
REPLY_TEXT_WAIT_S = 30.0  # after the speech ends, for the rest of the reply's text


@dataclass
class Turn:
    role: str  # "user" or "assistant"
    speaker: int
    text: str
    codes: torch.Tensor | None = None  # what CSM said, for assistant turns


@dataclass
class ChatMetrics:
    """When things happened, in seconds from the user's message."""

    started: float = field(default_factory=time.perf_counter)
    llm_first_token_s: float | None = None
    llm_first_piece_s: float | None = None  # the first speakable piece reached the engine
    llm_done_s: float | None = None
    first_audio_s: float | None = None
    pieces: int = 0

    def mark(self, name: str):
        if getattr(self, name) is None:
            setattr(self, name, time.perf_counter() - self.started)

    @property
    def llm_wait_share(self) -> float | None:
        """The part of the time to first audio spent waiting for the LLM's first piece."""
        if self.llm_first_piece_s is None or not self.first_audio_s:
            return None
        return min(1.0, self.llm_first_piece_s / self.first_audio_s)

    def as_dict(self) -> dict:
        ms = {k: None if v is None else v * 1000 for k, v in (
            ("llm_first_token_ms", self.llm_first_token_s),
            ("llm_first_piece_ms", self.llm_first_piece_s), ("llm_done_ms", self.llm_done_s),
            ("time_to_first_audio_ms", self.first_audio_s))}
        return {**ms, "llm_wait_share": self.llm_wait_share, "pieces": self.pieces}


class ReplyText:
    """An LLM's reply, cut into speakable pieces as it arrives and pushed into a TextFeed, on a
    thread of its own. A failure ends the feed with the error (the stream shows it)."""

    def __init__(self, config: LLMConfig, messages: list[dict], feed: TextFeed,
                 metrics: ChatMetrics, on_text=None, chunker: TextChunker | None = None):
        self.config, self.messages, self.feed, self.metrics = config, messages, feed, metrics
        self.on_text = on_text  # called with each piece as it is handed to the engine
        self.chunker = chunker or TextChunker()
        self.pieces: list[str] = []
        self.error: LLMError | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="csm-llm", daemon=True)

    def start(self) -> ReplyText:
        self._thread.start()
        return self

    def cancel(self):
        self._stop.set()

    def join(self, timeout: float | None = None):
        self._thread.join(timeout)

    @property
    def text(self) -> str:
        return " ".join(self.pieces)

    def _push(self, piece: str):
        self.pieces.append(piece)
        self.metrics.pieces += 1
        self.metrics.mark("llm_first_piece_s")
        self.feed.push(piece)
        if self.on_text is not None:
            self.on_text(piece)

    def _run(self):
        try:
            for delta in stream_reply(self.config, self.messages):
                self.metrics.mark("llm_first_token_s")
                if self._stop.is_set():  # nobody listens any more: no error to report
                    self.feed.close()
                    return
                for piece in self.chunker.feed(delta):
                    self._push(piece)
            for piece in self.chunker.flush():
                self._push(piece)
            self.metrics.mark("llm_done_s")
            if not self.pieces:
                raise LLMError(f"{self.config.describe()} gave an empty reply")
            self.feed.close()
        except LLMError as e:
            self.error = e
            self.feed.fail(e)


class Dialogue:
    """What was said, as LLM messages and as CSM context."""

    def __init__(self, voice=None, speaker: int = 0, user_speaker: int | None = None):
        self.voice = voice  # voices.Voice: its clip is the first context segment, always kept
        self.speaker = voice.speaker if voice is not None else speaker
        self.user_speaker = self.speaker + 1 if user_speaker is None else user_speaker
        self.turns: list[Turn] = []

    def messages(self, user_text: str) -> list[dict]:
        return [{"role": t.role, "content": t.text} for t in self.turns] + [
            {"role": "user", "content": user_text}]

    def context(self, token_count, window: int) -> tuple[Segment, ...]:
        """The voice, then the newest turns that fit CONTEXT_SHARE of the window.
        token_count(text, speaker) -> positions of a text segment."""
        budget = int(window * CONTEXT_SHARE)
        pinned = []
        if self.voice is not None:
            pinned = [self.voice.segment]
            budget -= self._size(self.voice.segment, token_count)
        kept = []
        for turn in reversed(self.turns):
            seg = Segment(turn.speaker, turn.text, codes=turn.codes)
            size = self._size(seg, token_count)
            if size > budget:
                break
            budget -= size
            kept.insert(0, seg)
        return tuple(pinned + kept)

    def context_for(self, sg) -> tuple[Segment, ...]:
        """The context for a StreamingGenerator: its window, its tokenizer."""
        gen = sg.generator
        return self.context(lambda t, s: len(gen.tokenize_text(t, s)[0]), sg.engine.window)

    @staticmethod
    def _size(seg: Segment, token_count) -> int:
        audio = 0 if seg.codes is None else len(seg.codes) + 1
        return token_count(seg.text, seg.speaker) + audio

    def add(self, user_text: str, reply_text: str, codes: torch.Tensor):
        self.turns += [Turn("user", self.user_speaker, user_text),
                       Turn("assistant", self.speaker, reply_text, codes)]


class Conversation:
    """A spoken dialogue with a StreamingGenerator (one reply at a time)."""

    def __init__(self, sg, llm: LLMConfig, voice=None, speaker: int = 0,
                 user_speaker: int | None = None, sampling: SamplingParams | None = None):
        self.sg, self.llm = sg, llm
        self.dialogue = Dialogue(voice, speaker, user_speaker)
        self.sampling = sampling or SamplingParams()  # max_audio_length_ms: a reply's longest
        self.metrics: ChatMetrics | None = None
        self.reply: ReplyText | None = None  # the last reply (its pieces and text)

    @property
    def turns(self) -> list[Turn]:
        return self.dialogue.turns

    def context(self) -> tuple[Segment, ...]:
        return self.dialogue.context_for(self.sg)

    def turn_sampling(self) -> SamplingParams:
        """The next reply's sampling: its seed is the seed plus the turn number (replies
        differ, runs repeat)."""
        seed = self.sampling.seed
        return replace(self.sampling, seed=None if seed is None else seed + len(self.turns) // 2)

    def speak_reply(self, user_text: str, on_text=None) -> Iterator[torch.Tensor]:
        """Stream the spoken reply to `user_text`. The LLM's first clause is spoken while the
        rest is written; on_text(piece) sees each piece of the text as it goes to the engine.
        Raises LLMError (the conversation is unchanged and goes on)."""
        if not isinstance(user_text, str) or not user_text.strip():
            raise ValueError("say something: the message is empty")
        self.metrics = metrics = ChatMetrics()
        req = GenerationRequest(user_text.strip(), self.dialogue.speaker, self.context(),
                                self.turn_sampling())
        feed = TextFeed(closed=False)
        self.reply = reply = ReplyText(self.llm, self.dialogue.messages(user_text.strip()), feed,
                                       metrics, on_text).start()
        listened = False
        try:  # the stream starts now: the voice's context is prepared while the LLM thinks
            for chunk in self.sg.stream(req, feed):
                metrics.mark("first_audio_s")
                yield chunk
            listened = True
        finally:
            if not listened:  # the listener stopped early: the rest of the reply is not wanted
                reply.cancel()
            # Speech can end before the text does (the length cap): the reply's text is still
            # the whole reply, which the LLM writes much faster than it is spoken.
            reply.join(REPLY_TEXT_WAIT_S if listened else 5)
            reply.cancel()
        if reply.error is not None:
            raise reply.error
        self.dialogue.add(user_text.strip(), reply.text, feed.stream.all_codes)
