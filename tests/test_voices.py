"""Named voices over HTTP: added (JSON or a form) and usable at once on every route, listed,
kept after a restart, deleted; every wrong field a 4xx that says what to do. At start, one
unusable voice file is skipped by name and a missing folder that was asked for is an error."""

import base64
import io
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import AUTH, TOKEN, LiveServer, speech_like
from csm_streaming.engine.voices import VoiceError, VoiceLibrary

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("voices")


@pytest.fixture(scope="module")
def live(folder, mimi):
    server = LiveServer(max_streams=2, voices=VoiceLibrary.load(folder))
    yield server
    server.close()


def clip_bytes(seconds=1.5, rate=44_100, channels=2, fmt="WAV") -> bytes:
    audio = speech_like(seconds, sr=rate, seed=3).numpy()
    buf = io.BytesIO()
    sf.write(buf, np.stack([audio] * channels, axis=1), rate, format=fmt)
    return buf.getvalue()


def add(live, name, clip=None, text="This is how I sound.", **extra):
    body = {"name": name, "text": text, **extra}
    if clip is not False:
        body["audio_base64"] = base64.b64encode(clip or clip_bytes()).decode()
    return httpx.post(f"{live.url}/v1/voices", json=body, headers=AUTH, timeout=60)


def speak(live, voice, **extra):
    return httpx.post(f"{live.url}/v1/audio/speech", headers=AUTH, timeout=120, json={
        "input": "In my new voice.", "voice": voice, "response_format": "pcm",
        "max_audio_length_ms": 800, "seed": 5, "top_k": 1, **extra})


def test_an_added_voice_speaks_at_once_everywhere_and_after_a_restart(live, folder,
                                                                      tiny_generator):
    r = add(live, "mira", speaker=3)
    assert r.status_code == 201, r.text
    assert r.json()["id"] == "mira" and r.json()["speaker"] == 3
    listed = httpx.get(f"{live.url}/v1/voices", headers=AUTH, timeout=10).json()
    named = [v for v in listed["data"] if v["type"] == "named"]
    assert [v["id"] for v in named] == ["mira"] and abs(named[0]["seconds"] - 1.52) < 0.1
    assert {"alloy", "nova"} <= {v["id"] for v in listed["data"] if v["type"] == "openai"}
    assert listed["speakers"] == {"min": 0, "max": 63}
    spoken = speak(live, "mira")
    assert spoken.status_code == 200
    # what a restart reads from the folder, encoded by an independent generator
    mira = VoiceLibrary.load(folder, tiny_generator).get("mira")
    assert (mira.speaker, mira.text) == (3, "This is how I sound.")
    solo = tiny_generator.generate("In my new voice.", 3, [mira.segment], 800, topk=1, seed=5)
    got = torch.from_numpy(np.frombuffer(spoken.content, "<i2").astype(np.float32) / 32767)
    expected = torch.from_numpy(np.clip(solo.numpy(), -1, 1) * 32767).round() / 32767
    torch.testing.assert_close(got, expected, atol=1.5 / 32767, rtol=0)
    from websockets.sync.client import connect

    with connect(live.url.replace("http", "ws") + "/v1/stream") as ws:
        ws.send(json.dumps({"text": "Hi.", "voice": "mira", "token": TOKEN,
                            "max_audio_length_ms": 160}))
        messages = [ws.recv(timeout=60) for _ in range(3)]
    assert json.loads(messages[-1])["type"] == "done"


def test_a_voice_posted_as_a_form_is_added_and_deleted(live, folder):
    r = httpx.post(f"{live.url}/v1/voices", headers=AUTH, timeout=60,
                   data={"name": "form-voice", "text": "Hello there.", "speaker": "1"},
                   files={"audio": ("clip.flac", clip_bytes(rate=16_000, channels=1,
                                                            fmt="FLAC"), "audio/flac")})
    assert r.status_code == 201, r.text
    assert (folder / "form-voice.wav").is_file() and speak(live, "form-voice").status_code == 200
    gone = httpx.delete(f"{live.url}/v1/voices/form-voice", headers=AUTH, timeout=10)
    assert gone.status_code == 200 and not list(folder.glob("form-voice.*"))
    refused = speak(live, "form-voice")
    assert refused.status_code == 400 and "form-voice" in refused.json()["error"]["message"]
    again = httpx.delete(f"{live.url}/v1/voices/form-voice", headers=AUTH, timeout=10)
    assert again.status_code == 404


def silent_clip() -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.zeros(48_000, dtype=np.float32), 24_000, format="WAV")
    return buf.getvalue()


WRONG = [
    ("../evil", None, {}, 400, "no path"),
    ("a b", None, {}, 400, "letters, digits"),
    ("short", clip_bytes(0.3), {}, 400, "1 to 60 s"),
    ("long", clip_bytes(31, rate=8_000, channels=1), {}, 400, "30"),
    ("empty", clip_bytes(0), {}, 400, "1 to 60 s"),
    ("silent", silent_clip(), {}, 400, "silent"),
    ("lowrate", clip_bytes(2, rate=4_000, channels=1), {}, 400, "rate"),
    ("garbage", b"not audio at all", {}, 400, "not a readable audio file"),
    ("noclip", False, {}, 400, "audio"),
    ("notext", None, {"text": "  "}, 400, "transcript"),
    ("-dash", None, {}, 400, "not starting with '-'"),
    ("CON", None, {}, 400, "reserved device name"),
    ("nul", None, {}, 400, "reserved device name"),
    ("com1", None, {}, 400, "reserved device name"),
    ("badspeaker", None, {"speaker": 64}, 400, "0..63"),
    ("boolspeaker", None, {"speaker": True}, 400, "0..63"),
]


@pytest.mark.parametrize("name, clip, extra, status, says", WRONG, ids=[w[0] for w in WRONG])
def test_a_wrong_voice_is_a_4xx_that_says_what_to_do(live, folder, name, clip, extra, status,
                                                     says):
    r = add(live, name, clip, **extra)
    assert r.status_code == status, r.text
    assert says in r.json()["error"]["message"]
    assert not list(folder.glob(f"{name.strip('./')}*"))  # nothing half-written
    message = r.json()["error"]["message"]
    assert " object at 0x" not in message and "Traceback" not in message and "/tmp" not in message


def test_a_name_must_be_a_string_and_writes_can_be_off(live, folder):
    r = httpx.post(f"{live.url}/v1/voices", headers=AUTH, timeout=30, json={
        "name": 123, "text": "Numbers.", "audio_base64": base64.b64encode(clip_bytes()).decode()})
    assert r.status_code == 400 and "name must be a string" in r.json()["error"]["message"]
    assert not list(folder.glob("123*"))
    settings = live.app.state.ctx.settings
    live.app.state.ctx.settings = replace(settings, voice_writes=False)
    try:
        refused = add(live, "notnow")
        gone = httpx.delete(f"{live.url}/v1/voices/notnow", headers=AUTH, timeout=10)
    finally:
        live.app.state.ctx.settings = settings
    assert refused.status_code == 403 and "--token" in refused.json()["error"]["message"]
    assert gone.status_code == 403 and not list(folder.glob("notnow*"))


def test_a_taken_name_is_a_409_and_voices_need_the_token(live):
    assert add(live, "twice").status_code == 201
    taken = add(live, "twice")
    assert taken.status_code == 409 and "delete it first" in taken.json()["error"]["message"]
    stranger = httpx.post(f"{live.url}/v1/voices", json={"name": "x"}, timeout=10)
    assert stranger.status_code == 401
    assert httpx.delete(f"{live.url}/v1/voices/twice", timeout=10).status_code == 401
    assert httpx.delete(f"{live.url}/v1/voices/twice", headers=AUTH, timeout=10).status_code == 200


def test_one_bad_voice_file_is_skipped_by_name_and_the_others_work(tmp_path, caplog):
    sf.write(tmp_path / "good.wav", speech_like(1.0).numpy(), 24_000)
    (tmp_path / "good.txt").write_text("Fine.")
    sf.write(tmp_path / "mute.wav", np.zeros(2400, dtype=np.float32), 24_000)  # no transcript
    (tmp_path / "broken.wav").write_bytes(b"RIFF nonsense")
    (tmp_path / "broken.txt").write_text("Broken.")
    with caplog.at_level("WARNING", logger="csm.voices"):
        lib = VoiceLibrary.load(tmp_path)
    assert lib.names() == ["good"] and sorted(lib.skipped) == ["broken.wav", "mute.wav"]
    assert "voice mute.wav skipped" in caplog.text and "voice broken.wav skipped" in caplog.text
    assert "mute.txt is missing" in lib.skipped["mute.wav"]
    with pytest.raises(VoiceError, match="mute.txt is missing"):  # asked for by name: why not
        lib.get("mute")
    lib.remove("mute")  # an unusable voice can be deleted, and its name used again
    assert not (tmp_path / "mute.wav").exists() and "mute.wav" not in lib.skipped
    lib.add("broken", "Fixed now.", speech_like(1.2).numpy(), 24_000)
    assert "broken.wav" not in lib.skipped and lib.get("broken").text == "Fixed now."
    with pytest.raises(VoiceError, match="does not exist"):
        VoiceLibrary.load(tmp_path / "nowhere", must_exist=True)
    assert VoiceLibrary.load(tmp_path / "nowhere").names() == []  # the default folder may be absent


def test_the_server_names_a_missing_voices_folder_before_loading_the_model(tmp_path):
    missing = tmp_path / "no-such-folder"
    r = subprocess.run([sys.executable, "-m", "csm_streaming.server.app", "--model",
                        "random:tiny", "--voices-dir", str(missing)], capture_output=True,
                       text=True, timeout=120, cwd=tmp_path,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2 and str(missing) in r.stderr and "does not exist" in r.stderr
    assert "warm-up" not in r.stderr and "Uvicorn running" not in r.stderr
