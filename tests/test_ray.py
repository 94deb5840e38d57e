"""Ray Serve, locally on this CPU: two replicas of the server (random:tiny), clients spread over
them, one replica killed mid-stream."""

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray", reason="Ray Serve is installed by bash setup.sh --dev")


@pytest.fixture(scope="module")
def cluster():
    from ray import serve

    from csm_streaming.server import ray_serve
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env=ray_serve.runtime_env(remote=False))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = ray_serve.build_app({"server_args": ["--model", "random:tiny", "--no-watermark"],
                               "replicas": 2, "max_streams": 4, "torch_threads": 1})
    serve.run(app, name="csm", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


def speak(url, i, ms, started=None, **extra):
    """The PCM of one speech request; `started` (an Event) is set when its first bytes came."""
    body = {"input": f"Client {i} over Ray.", "voice": str(i % 3), "seed": 50 + i,
            "top_k": 1 + 7 * i, "response_format": "pcm", "max_audio_length_ms": ms, **extra}
    with httpx.stream("POST", f"{url}/v1/audio/speech", json=body, timeout=300) as r:
        assert r.status_code == 200
        parts = []
        for part in r.iter_bytes():
            parts.append(part)
            if started is not None:
                started.set()
        return b"".join(parts)


def quantized(audio):
    return torch.from_numpy(np.clip(audio.numpy(), -1, 1) * 32767).round() / 32767


def test_clients_spread_over_replicas_each_get_their_solo_audio(cluster, tiny_generator):
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: speak(cluster, i, 800), range(8)))
    for i, data in enumerate(results):
        solo = tiny_generator.generate(f"Client {i} over Ray.", i % 3, max_audio_length_ms=800,
                                       seed=50 + i, topk=1 + 7 * i)
        audio = torch.from_numpy(np.frombuffer(data, dtype="<i2").astype(np.float32) / 32767)
        torch.testing.assert_close(audio, quantized(solo), atol=1.5 / 32767, rtol=0)
    replicas = set()
    for _ in range(20):  # both replicas answer (/metrics is the answering replica's own)
        text = httpx.get(f"{cluster}/metrics", timeout=30).text
        replicas |= {line.split('replica="')[1].split('"')[0] for line in text.splitlines()
                     if line.startswith("csm_stream_slots{")}
    assert len(replicas) == 2


def test_a_dead_replica_is_replaced_its_clients_see_an_error_the_others_finish(cluster):
    full = 150 * 1920 * 2  # 12 s of 16-bit audio: far from done when the replica dies
    started = [threading.Event() for _ in range(6)]

    def client(i):
        try:
            data = speak(cluster, 100 + i, 12_000, started[i])
            return "complete" if len(data) == full else f"truncated: {len(data)} bytes"
        except (httpx.HTTPError, AssertionError) as e:
            return f"error: {type(e).__name__}"

    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(client, i) for i in range(6)]
        for event in started:  # every stream is under way (its first audio came), not a guess
            assert event.wait(120)
        replicas = replica_actors()
        assert len(replicas) == 2
        ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]),
                 no_restart=True)
        outcomes = [f.result(timeout=300) for f in futures]
    assert not [o for o in outcomes if o.startswith("truncated")], outcomes  # never a silent cut
    assert "complete" in outcomes and any(o.startswith("error") for o in outcomes), outcomes
    deadline = time.monotonic() + 120
    while True:  # new requests are served (by the survivor, then by the replacement too)
        try:
            assert len(speak(cluster, 200, 400)) == 5 * 1920 * 2
            break
        except (httpx.HTTPError, AssertionError):
            assert time.monotonic() < deadline
            time.sleep(2)
    deadline = time.monotonic() + 180
    while len(replica_actors()) < 2 or replicas[0] in replica_actors():
        assert time.monotonic() < deadline, "the dead replica was not replaced"
        time.sleep(2)


def replica_actors() -> list[dict]:
    """The replicas' named actors that are alive (no dashboard needed)."""
    from ray.util import list_named_actors

    alive = []
    for a in list_named_actors(all_namespaces=True):
        if "CSMReplica" in a["name"]:
            try:
                ray.get_actor(a["name"], namespace=a["namespace"])
                alive.append(a)
            except ValueError:  # gone
                pass
    return alive
