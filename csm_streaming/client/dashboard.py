"""A live terminal view of a stream: RTF, first audio, chunks, buffer, underruns, memory.

No torch here: it renders `Snapshot`s, small dataclasses built by the caller. In a terminal it
is a rich `Live` panel refreshed several times a second; when stdout is not a terminal (logs,
CI) it prints one plain line per update instead.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field

SPARK = "▁▂▃▄▅▆▇█"


@dataclass
class Snapshot:
    device: str = "cpu"
    status: str = "starting"
    rtf_now: float = math.inf  # the last chunk's generation time / its audio time
    rtf: float = math.inf  # overall
    ttfa_ms: float | None = None
    chunks: int = 0
    chunk_gen_ms: list[float] = field(default_factory=list)
    frames: int = 0
    frames_per_s: float = 0.0
    audio_s: float = 0.0
    buffer_ms: float | None = None  # None when nothing is playing
    prebuffer_ms: float | None = None
    underruns: int = 0
    memory_mb: float = 0.0
    events: list[str] = field(default_factory=list)  # fallbacks, retries, warnings
    llm_ms: float | None = None  # chat: the LLM's first speakable words, from the message
    llm_share: float | None = None  # ... as a share of the time to first audio


def sparkline(values: list[float], width: int = 40) -> str:
    values = values[-width:]
    if not values:
        return ""
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    return "".join(
        SPARK[min(len(SPARK) - 1, int((v - lo) / span * (len(SPARK) - 1)))] for v in values
    )


def _rtf(v: float) -> str:
    return "-" if not math.isfinite(v) else f"{v:.3f}"


def plain_line(s: Snapshot) -> str:
    buf = "" if s.buffer_ms is None else f" buffer={s.buffer_ms:.0f}ms underruns={s.underruns}"
    ttfa = "-" if s.ttfa_ms is None else f"{s.ttfa_ms:.0f}ms"
    last = f"{s.chunk_gen_ms[-1]:.0f}ms" if s.chunk_gen_ms else "-"
    llm = "" if s.llm_ms is None else f" llm_first_words={s.llm_ms:.0f}ms"
    return (f"[{s.status}] chunk {s.chunks} frames={s.frames} audio={s.audio_s:.2f}s "
            f"rtf_now={_rtf(s.rtf_now)} rtf={_rtf(s.rtf)} ttfa={ttfa} chunk_gen={last}{buf} "
            f"fps={s.frames_per_s:.1f} mem={s.memory_mb:.0f}MB device={s.device}{llm}")


def render(s: Snapshot):
    from rich.panel import Panel
    from rich.table import Table

    t = Table.grid(padding=(0, 2))
    t.add_column(style="bold cyan", justify="right")
    t.add_column()
    realtime = "faster than real time" if s.rtf < 1 else "slower than real time"
    t.add_row(
        "RTF now / overall",
        f"{_rtf(s.rtf_now)} / {_rtf(s.rtf)}  ({realtime if math.isfinite(s.rtf) else '-'})",
    )
    t.add_row("first audio", "-" if s.ttfa_ms is None else f"{s.ttfa_ms:.0f} ms")
    if s.llm_ms is not None:
        share = "" if s.llm_share is None else f" ({s.llm_share:.0%} of the wait for first audio)"
        t.add_row("LLM first words", f"{s.llm_ms:.0f} ms{share}")
    last = f"{s.chunk_gen_ms[-1]:.0f} ms" if s.chunk_gen_ms else "-"
    t.add_row("chunks", f"{s.chunks}  (last {last})")
    t.add_row("chunk time", sparkline(s.chunk_gen_ms))
    t.add_row("frames", f"{s.frames}  ({s.frames_per_s:.1f}/s, {s.audio_s:.2f} s of audio)")
    if s.buffer_ms is not None:
        pre = "" if s.prebuffer_ms is None else f" (prebuffer {s.prebuffer_ms:.0f} ms)"
        t.add_row("buffer", f"{s.buffer_ms:.0f} ms{pre}")
        t.add_row("underruns", f"[{'red' if s.underruns else 'green'}]{s.underruns}[/]")
    t.add_row("device / memory", f"{s.device} / {s.memory_mb:.0f} MB")
    for e in s.events[-3:]:
        t.add_row("[yellow]note[/]", e)
    return Panel(t, title=f"CSM streaming — {s.status}", expand=False)


class Dashboard:
    """`update(snapshot)` from the producer; renders at `refresh_per_second` in a terminal."""

    def __init__(self, enabled: bool = True, refresh_per_second: float = 8, file=None,
                 force_terminal: bool | None = None):
        self.file = file or sys.stdout
        is_tty = self.file.isatty() if force_terminal is None else force_terminal
        self.enabled = enabled
        self.live = None
        self.snapshot = Snapshot()
        self._last_plain = 0.0
        self._printed = None  # the snapshot last printed as a plain line
        if enabled and is_tty:
            from rich.console import Console
            from rich.live import Live

            console = Console(file=self.file, force_terminal=True)
            self.live = Live(render(self.snapshot), console=console,
                             refresh_per_second=refresh_per_second, transient=False)

    def __enter__(self):
        if self.live is not None:
            self.live.__enter__()
        return self

    def __exit__(self, *exc):
        if self.live is not None:
            self.live.update(render(self.snapshot))
            self.live.__exit__(*exc)
        elif self.enabled and self._printed is not self.snapshot:  # not printed twice
            print(plain_line(self.snapshot), file=self.file, flush=True)
        return False

    def update(self, snapshot: Snapshot, force: bool = False):
        self.snapshot = snapshot
        if not self.enabled:
            return
        if self.live is not None:
            self.live.update(render(snapshot))
        elif force or time.monotonic() - self._last_plain >= 0.25:
            self._last_plain = time.monotonic()
            self._printed = snapshot
            print(plain_line(snapshot), file=self.file, flush=True)
