"""What a stream says, segment by segment, as it becomes known: all at once (a text cut at
sentence ends) or while it speaks (an LLM's reply, an agent's context)."""

from __future__ import annotations

import threading


class TextFeed:
    """What a stream says, segment by segment. Closed: all known at submit (a text split at
    sentence ends). Open: segments arrive while it speaks (an LLM's reply); `close()` when the
    last has come, `fail(error)` when the producer failed. Thread-safe; `on_push` wakes the
    engine's thread."""

    def __init__(self, segments=(), closed: bool = True, segmented: bool | None = None):
        self._segments = [s for s in segments]
        self._closed = closed
        # Segmented: its pieces were cut by someone else (a list of sentences, an LLM's reply):
        # each segment gets the per-sentence frame cap, even when there is only one, so the
        # same pieces always give the same speech. A closed feed of one segment is a plain
        # text: all of max_audio_length_ms, as the reference loop.
        self.segmented = (not closed) if segmented is None else segmented
        self.stream = None  # the engine's Stream speaking it, once admitted
        self._lock = threading.Lock()
        self.error: BaseException | None = None
        self.on_push = None

    def push(self, text: str):
        with self._lock:
            if self._closed:
                raise RuntimeError("push to a closed TextFeed")
            self._segments.append(text)
        self._wake()

    def close(self):
        with self._lock:
            self._closed = True
        self._wake()

    def fail(self, error: BaseException):
        with self._lock:
            self.error, self._closed = error, True
        self._wake()

    def _wake(self):
        if self.on_push is not None:
            self.on_push()

    def get(self, i: int) -> str | None:
        with self._lock:
            return self._segments[i] if i < len(self._segments) else None

    def exhausted(self, i: int) -> bool:
        """No segment i will ever come."""
        with self._lock:
            return self._closed and i >= len(self._segments)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def known(self) -> list[str]:
        with self._lock:
            return list(self._segments)
