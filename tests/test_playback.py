"""Playback with a real audio clock (JACK's dummy driver), the dashboard, the command line."""

import os
import pty
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from csm_streaming.client.dashboard import Dashboard, Snapshot, plain_line, sparkline
from csm_streaming.client.playback import AudioPlayer, RingBuffer, choose_prebuffer_s, play_stream

ROOT = Path(__file__).resolve().parent.parent
SR = 24_000


# -- the ring buffer ------------------------------------------------------------------------------


def test_ring_buffer_wraps_and_keeps_order_across_threads():
    rb = RingBuffer(1000)  # much smaller than what flows through it: wraps many times
    data = np.arange(50_000, dtype=np.float32)
    got = np.zeros_like(data)

    def produce():
        for i in range(0, data.size, 333):
            rb.write(data[i:i + 333], timeout=5)
        rb.close()

    t = threading.Thread(target=produce)
    t.start()
    out = np.zeros(256, dtype=np.float32)
    n_total = 0
    deadline = time.monotonic() + 10
    while n_total < data.size and time.monotonic() < deadline:
        n = rb.read_into(out)
        got[n_total:n_total + n] = out[:n]
        n_total += n
    t.join(5)
    assert n_total == data.size and np.array_equal(got, data)
    assert rb.available == 0 and rb.closed


def test_ring_buffer_full_write_times_out():
    rb = RingBuffer(10)
    rb.write(np.ones(10))
    with pytest.raises(TimeoutError):
        rb.write(np.ones(1), timeout=0.1)


def test_prebuffer_follows_the_rtf():
    assert choose_prebuffer_s(0.3, 0.16, 10) == pytest.approx(0.26)  # fast: one chunk + margin
    assert choose_prebuffer_s(2.0, 0.16, 10) == pytest.approx(5.1)  # half real time: half ahead
    assert choose_prebuffer_s(float("inf"), 0.16, 3.0) == 3.0  # nothing known: all of it


# -- real playback through JACK's dummy driver (a real-time clock without a sound card) ---------


def feed(player, seconds, chunk_s, pause_s):
    rng = np.random.default_rng(0)
    n = 0
    while n < seconds * SR:
        chunk = (0.1 * rng.standard_normal(int(chunk_s * SR))).astype(np.float32)
        player.write(chunk)
        n += chunk.size
        time.sleep(pause_s)
    player.finish()
    return n


def test_faster_than_real_time_plays_everything_without_underruns(jack_device):
    player = AudioPlayer(SR, device=jack_device, prebuffer_s=0.2)
    with player:
        t0 = time.monotonic()
        written = feed(player, seconds=2.0, chunk_s=0.16, pause_s=0.04)  # 4x real time
        assert player.wait(10), "playback did not drain"
        elapsed = time.monotonic() - t0
    stats = player.stats()
    assert stats.underruns == 0
    assert player.buffer.read_total == written == player.buffer.written  # exactly what was written
    assert 1.8 < elapsed < 3.5  # the clock is real: 2 s of audio take about 2 s


def test_slower_than_real_time_is_detected(jack_device):
    player = AudioPlayer(SR, device=jack_device, prebuffer_s=0.08)
    with player:
        feed(player, seconds=1.0, chunk_s=0.08, pause_s=0.16)  # half real time
        assert player.wait(10)
    assert player.stats().underruns >= 3


def test_play_stream_passes_chunks_on_and_drains(jack_device):
    chunks = [np.full(3840, 0.01 * i, dtype=np.float32) for i in range(6)]
    player = AudioPlayer(SR, device=jack_device)
    seen = []
    with player:
        out = list(play_stream(iter(chunks), SR, rtf_hint=0.2, expected_total_s=1.0, player=player,
                               on_chunk=seen.append))
    assert len(out) == 6 and all(o is c for o, c in zip(out, chunks))
    assert player.buffer.read_total == sum(c.size for c in chunks)
    assert seen and seen[-1].finished


# -- the dashboard --------------------------------------------------------------------------------


def snap(**kw):
    base = dict(device="cpu", status="generating", rtf_now=0.4321, rtf=0.5123, ttfa_ms=187.0,
                chunks=3, chunk_gen_ms=[120.0, 90.0, 95.0], frames=12, frames_per_s=25.0,
                audio_s=0.96, buffer_ms=640.0, prebuffer_ms=260.0, underruns=1, memory_mb=512)
    base.update(kw)
    return Snapshot(**base)


def test_plain_lines_when_not_a_terminal(tmp_path):
    out = tmp_path / "log.txt"
    with open(out, "w") as f:
        with Dashboard(file=f) as d:
            d.update(snap(), force=True)
            d.update(snap(chunks=4, status="done"), force=True)
    text = out.read_text()
    assert "rtf_now=0.432 rtf=0.512" in text and "buffer=640ms underruns=1" in text
    assert "\x1b[" not in text  # no terminal escape codes in logs
    assert text.count("[done]") == 1  # the last line is not printed twice
    assert plain_line(snap(buffer_ms=None)).count("buffer") == 0


def test_dashboard_in_a_pseudo_terminal():
    code = (
        f"import sys, time; sys.path.insert(0, {str(ROOT)!r})\n"
        "from csm_streaming.client.dashboard import Dashboard, Snapshot\n"
        "with Dashboard(refresh_per_second=10) as d:\n"
        "    for i in range(5):\n"
        "        d.update(Snapshot(device='cpu', status='generating', rtf_now=0.25+i/100, rtf=0.3,"
        " ttfa_ms=150, chunks=i+1, chunk_gen_ms=[80.0+i]*(i+1), frames=4*(i+1), frames_per_s=50,"
        " audio_s=0.32*(i+1), buffer_ms=480, prebuffer_ms=260, underruns=0, memory_mb=300))\n"
        "        time.sleep(0.12)\n"
    )
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=slave, stderr=slave, stdin=slave,
                            env=dict(os.environ, COLUMNS="100", LINES="30", TERM="xterm"))
    os.close(slave)
    data = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:
            break
        if not chunk:
            break
        data += chunk
    proc.wait(10)
    os.close(master)
    text = data.decode("utf-8", "replace")
    assert proc.returncode == 0, text[-2000:]
    assert "\x1b[" in text  # it animated (cursor movement), unlike the plain mode
    assert "RTF now / overall" in text and "0.290 / 0.300" in text  # the last update was drawn
    assert "480 ms" in text and "prebuffer 260 ms" in text
    assert text.count("RTF now") >= 3  # redrawn several times


def test_sparkline_scales():
    assert sparkline([1, 2, 3, 4, 5, 6, 7, 8]) == "▁▂▃▄▅▆▇█"
    assert sparkline([]) == ""


def test_a_slower_than_real_time_producer_plays_without_a_stall(jack_device):
    """play_stream sizes its prebuffer from the measured RTF: a producer at half real time
    still plays through to the end on a real audio clock without one underrun."""
    def slow_chunks(n=10, chunk_s=0.12, rtf=2.0):
        for i in range(n):
            time.sleep(chunk_s * rtf)
            yield np.full(int(chunk_s * SR), 0.01 * (i + 1), dtype=np.float32)

    player = AudioPlayer(SR, device=jack_device)
    with player:
        out = list(
            play_stream(slow_chunks(), SR, rtf_hint=2.0, expected_total_s=1.2, player=player)
        )
    assert len(out) == 10 and player.underruns == 0
    assert player.buffer.read_total == 10 * int(0.12 * SR)
