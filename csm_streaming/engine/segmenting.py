"""Where text is cut into spoken segments.

A whole text is cut at sentence ends (`split_sentences`): each piece is spoken as one segment,
conditioned on the ones before. An LLM's reply arrives a few characters at a time; `TextChunker`
cuts it as it comes: the first piece at the first clause end (so audio starts early), later
pieces at sentence ends (whole sentences sound better), and any piece at `max_chars`.
"""

from __future__ import annotations

import re

_SENTENCE_END = re.compile(r"(?<=[.!?;:])\s+|\n+")


def split_sentences(text: str, max_chars: int = 250) -> list[str]:
    """Split at sentence ends into pieces of at most ~max_chars (a longer sentence stays whole
    unless it has commas to break at). Short text comes back as one piece."""
    text = " ".join(text.split())
    if len(text) <= max_chars:
        return [text]
    pieces: list[str] = []
    for sentence in (s.strip() for s in _SENTENCE_END.split(text)):
        if not sentence:
            continue
        parts = [sentence]
        if len(sentence) > max_chars:  # break a run-on sentence at commas
            parts, cur = [], ""
            for clause in re.split(r"(?<=,)\s+", sentence):
                if cur and len(cur) + 1 + len(clause) > max_chars:
                    parts.append(cur)
                    cur = clause
                else:
                    cur = f"{cur} {clause}".strip()
            parts.append(cur)
        for part in parts:
            if pieces and len(pieces[-1]) + 1 + len(part) <= max_chars:
                pieces[-1] = f"{pieces[-1]} {part}"
            else:
                pieces.append(part)
    return pieces


# Abbreviations whose period does not end a sentence.
_ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "prof", "st", "vs", "etc", "e.g", "i.e", "jr", "sr",
                  "no", "approx", "mt", "inc", "ltd", "co"}
_MARKDOWN = [(re.compile(r"```.*?```", re.S), " "), (re.compile(r"`([^`]*)`"), r"\1"),
             (re.compile(r"\[([^\]]*)\]\([^)]*\)"), r"\1"),  # [text](link) -> text
             (re.compile(r"^\s{0,3}(#{1,6}|[-*+]|\d+[.)])\s+", re.M), ""),  # headings, bullets
             (re.compile(r"(\*\*|__|\*|_|~~)(?=\S)(.+?)(?<=\S)\1"), r"\2")]  # emphasis


def clean_markdown(text: str) -> str:
    """What an LLM writes for a screen -> what should be spoken: no markup, one line."""
    for pattern, repl in _MARKDOWN:
        text = pattern.sub(repl, text)
    return " ".join(text.replace("*", " ").split())


class TextChunker:
    """Cut text that arrives in pieces into speakable segments as soon as each is complete.

    feed(delta) -> the segments completed by this delta; flush() -> what is left at the end.
    """

    def __init__(self, first_min_chars: int = 12, min_chars: int = 40, clause_chars: int = 120,
                 max_chars: int = 250):
        if not 0 < first_min_chars <= min_chars <= clause_chars <= max_chars:
            raise ValueError("TextChunker: 0 < first_min_chars <= min_chars <= clause_chars "
                             "<= max_chars")
        self.first_min_chars, self.min_chars = first_min_chars, min_chars
        self.clause_chars, self.max_chars = clause_chars, max_chars
        self._buffer = ""
        self.pieces = 0

    def feed(self, delta: str) -> list[str]:
        self._buffer += delta
        out = []
        while True:
            cut = self._cut()
            if cut is None:
                return out
            piece, self._buffer = self._buffer[:cut], self._buffer[cut:]
            piece = clean_markdown(piece)
            if piece:
                out.append(piece)
                self.pieces += 1

    @property
    def pending(self) -> bool:
        """Text is waiting for the end of its sentence or clause."""
        return bool(self._buffer.strip())

    def flush(self) -> list[str]:
        piece, self._buffer = clean_markdown(self._buffer), ""
        if not piece:
            return []
        self.pieces += 1
        return [piece]

    def _cut(self) -> int | None:
        """Where the next piece ends in the buffer (an index), or None to wait for more text."""
        buf = self._buffer
        first = self.pieces == 0
        sentence_min = self.first_min_chars if first else self.min_chars
        clause_min = self.first_min_chars if first else self.clause_chars
        best = None
        for m in re.finditer(r"([.!?]+[\"')\]]*|[,;:\u2014\u2013]|\n)(\s+)", buf):
            end = m.end(1)
            mark = m.group(1)
            if mark[0] == "." and self._is_abbreviation(buf[:m.start(1)]):
                continue
            sentence = mark[0] in ".!?\n"
            if len(buf[:end].strip()) >= (sentence_min if sentence else clause_min):
                return m.end()
            if end > self.max_chars:
                break
            best = m.end()
        if len(buf) > self.max_chars:  # no good place: the last clause, else the last space
            if best is not None:
                return best
            space = buf.rfind(" ", 0, self.max_chars)
            return space + 1 if space > 0 else self.max_chars
        return None

    @staticmethod
    def _is_abbreviation(before: str) -> bool:
        word = re.split(r"\s", before.rstrip())[-1].lower() if before.strip() else ""
        return word in _ABBREVIATIONS or (len(word) == 1 and word.isalpha())
