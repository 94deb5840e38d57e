"""A bounded shutdown: on SIGTERM the server admits nothing new, lets streams run for the grace
period, then ends each with an error its client sees, and exits."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from conftest import wait_until_healthy

GRACE_S = 2.0


def test_sigterm_ends_long_streams_with_an_error_within_the_grace_period(tmp_path):
    from websockets.sync.client import connect

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = Path(sys.executable).parent / "csm-server"
    proc = subprocess.Popen([str(server), "--model", "random:tiny", "--no-watermark", "--port",
                             str(port), "--shutdown-grace", str(GRACE_S)], cwd=tmp_path,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    long = {"max_audio_length_ms": 35_000, "seed": 1}  # far longer than the grace period
    try:
        wait_until_healthy(proc, base)
        sse_events, ws_messages = [], []
        started = threading.Barrier(3)

        def sse():
            body = {"input": "A long one.", "stream_format": "sse", **long}
            with httpx.stream("POST", f"{base}/v1/audio/speech", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        sse_events.append(json.loads(line[6:]))
                        if len(sse_events) == 1:
                            started.wait()

        def ws():
            with connect(f"ws://127.0.0.1:{port}/v1/stream") as c:
                c.send(json.dumps({"text": "Another long one.", **long}))
                while True:
                    m = c.recv(timeout=60)
                    if isinstance(m, bytes):
                        if not ws_messages:
                            started.wait()
                        ws_messages.append({"type": "audio"})
                    else:
                        ws_messages.append(json.loads(m))
                        if ws_messages[-1]["type"] in ("done", "error"):
                            return

        threads = [threading.Thread(target=f, daemon=True) for f in (sse, ws)]
        for t in threads:
            t.start()
        started.wait(timeout=120)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        refused = httpx.post(f"{base}/v1/audio/speech", json={"input": "Too late."}, timeout=10)
        proc.wait(timeout=GRACE_S + 15)
        exit_s = time.monotonic() - t0
        for t in threads:
            t.join(10)
    finally:
        if proc.poll() is None:
            proc.kill()
        out = proc.communicate()[0]
    assert refused.status_code == 503 and "shutting down" in refused.json()["error"]["message"]
    assert refused.headers.get("retry-after")
    assert exit_s < GRACE_S + 6, (exit_s, out[-2000:])
    assert sse_events[-1]["type"] == "error" and "shut down" in sse_events[-1]["message"]
    assert ws_messages[-1]["type"] == "error" and "shut down" in ws_messages[-1]["message"]
    assert not any(e["type"] == "speech.audio.done" for e in sse_events)
    assert "Traceback" not in out
