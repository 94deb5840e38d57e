"""What `pip install` gives: one top-level name with the page's files and two commands, a server
that runs from the wheel outside the checkout, a client that needs no torch, and pins that fit
the declared ranges."""

import os
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
import tomllib
from packaging.requirements import Requirement

from conftest import TOKEN, LiveServer, wait_until_healthy

ROOT = Path(__file__).resolve().parent.parent
PAGE = {"index.html", "app.js", "player-worklet.js"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                        "-q", "-w", str(out), str(ROOT)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    (path,) = out.glob("csm_streaming-*.whl")
    return path


def test_the_wheel_holds_one_top_level_name_the_page_and_the_commands(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"csm_streaming"}
    assert PAGE <= {Path(n).name for n in names if n.startswith("csm_streaming/server/web/")}
    for sub in ("model", "engine", "chat", "server", "client"):
        assert f"csm_streaming/{sub}/__init__.py" in names
    (entry,) = [n for n in names if n.endswith("entry_points.txt")]
    scripts = zipfile.ZipFile(wheel).read(entry).decode()
    assert "csm-stream = csm_streaming.cli:main" in scripts
    assert "csm-server = csm_streaming.cli:server_main" in scripts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_installed_server_serves_the_page_and_speech(wheel, tmp_path):
    """Installed from the wheel into a folder of its own and run from outside the checkout with
    its console script: the page at /, speech on the OpenAI route and the WebSocket; offline on
    a random model with the watermark stage on, and a request without a length gets random
    models' short default, not minutes of noise."""
    target = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                        str(target), str(wheel)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    env = {**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1"}
    where = subprocess.run([sys.executable, "-c",
                            "import csm_streaming; print(csm_streaming.__file__)"], cwd=tmp_path,
                           env=env, capture_output=True, text=True, timeout=60)
    assert where.stdout.strip().startswith(str(target)), where.stdout + where.stderr
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(target / "bin" / "csm-server"), "--model",
                             "random:tiny", "--port", str(port)], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(proc, base)
        assert httpx.get(f"{base}/health", timeout=10).json()["watermark"] is True
        page = httpx.get(f"{base}/", timeout=10)
        assert page.status_code == 200 and "<html" in page.text.lower()
        assert httpx.get(f"{base}/web/app.js", timeout=10).status_code == 200
        speech = httpx.post(f"{base}/v1/audio/speech", timeout=120, json={
            "input": "Installed.", "response_format": "pcm"})
        assert speech.status_code == 200 and len(speech.content) == 37 * 1920 * 2  # 3 s, not 90
        out = tmp_path / "ws.wav"
        client = subprocess.run([sys.executable, str(target / "bin" / "csm-stream"), "--server",
                                 base, "--text", "Hi.", "--max-audio-ms", "800", "--output",
                                 str(out), "--no-dashboard"], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=120)
        assert client.returncode == 0, client.stderr
        assert sf.info(out).frames == 10 * 1920
    finally:
        proc.terminate()
        log = proc.communicate(timeout=30)[0]
    assert "Traceback" not in log


NO_TORCH_CLIENT = """
import sys
sys.modules["torch"] = None  # any import of torch now fails
from csm_streaming.cli import main
code = main(sys.argv[1:])
loaded = [m for m, mod in sys.modules.items() if mod is not None]
assert not [m for m in loaded if m.startswith(("torch", "csm_streaming.model.csm",
                                               "csm_streaming.engine"))], loaded
sys.exit(code)
"""


def test_the_client_listens_to_a_server_without_torch(tmp_path, jack_device):
    """csm-stream --server in a process where importing torch is impossible: it writes the
    audio and plays it through a real (JACK dummy) sound card."""
    live = LiveServer(max_streams=2)
    out = tmp_path / "client.wav"
    try:
        r = subprocess.run([sys.executable, "-c", NO_TORCH_CLIENT, "--server", live.url,
                            "--token", TOKEN, "--text", "No torch here.", "--seed", "2",
                            "--max-audio-ms", "800", "--output", str(out), "--play-audio",
                            "--no-dashboard"], cwd=ROOT, capture_output=True, text=True,
                           timeout=180)
    finally:
        live.close()
    assert r.returncode == 0, r.stderr[-3000:]
    audio, sr = sf.read(out, dtype="float32")
    assert sr == 24_000 and audio.shape == (10 * 1920,) and np.abs(audio).max() > 0
    assert "underruns" in r.stderr


def pyproject_requirements() -> list[Requirement]:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(meta["dependencies"])
    for extra in meta["optional-dependencies"].values():
        reqs += extra
    return [Requirement(r) for r in reqs]


def pins() -> dict[str, str]:
    out = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", f"requirements.txt: {line} is not an exact pin"
            out[req.name.lower().replace("_", "-")] = spec.version
    return out


def test_every_pin_satisfies_the_declared_range():
    pinned = pins()
    for req in pyproject_requirements():
        name = req.name.lower().replace("_", "-")
        assert name in pinned, f"{req.name} is declared in pyproject.toml but not pinned"
        assert req.specifier.contains(pinned[name], prereleases=True), (
            f"requirements.txt pins {name}=={pinned[name]}, outside pyproject's {req.specifier}")
        assert not any(s.operator == "==" for s in req.specifier), (
            f"pyproject.toml pins {req}: declare a range, pin in requirements.txt")


def test_the_pin_check_catches_a_pin_outside_its_range():
    req = Requirement("torch>=2.5")
    assert not req.specifier.contains("2.4.1") and req.specifier.contains("2.13.0")


def test_the_server_command_in_a_client_install_says_what_to_install():
    code = ("import sys; sys.modules['torch'] = None\n"
            "from csm_streaming.cli import server_main\n"
            "sys.exit(server_main(['--model', 'random:tiny']))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "csm-streaming[engine]" in r.stderr and "torch" in r.stderr


def test_setup_client_installs_a_client_that_listens_without_torch(tmp_path):
    """`bash setup.sh --client` in a fresh copy of the checkout, as on a laptop: its own venv,
    no torch in it, and its `csm-stream --server` writes a live server's audio. pip's cache makes
    a second run quick; the first downloads the client's few wheels."""
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    copy = tmp_path / "clone"
    for name in files:
        if (ROOT / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            (copy / name).write_bytes((ROOT / name).read_bytes())
    setup = subprocess.run(["bash", "setup.sh", "--client"], cwd=copy, capture_output=True,
                           text=True, timeout=600, env={**os.environ, "PYTHON": sys.executable})
    assert setup.returncode == 0, setup.stdout[-2000:] + setup.stderr[-2000:]
    assert "setup: ok (client)" in setup.stdout
    venv_python = copy / ".venv" / "bin" / "python"
    no_torch = subprocess.run([str(venv_python), "-c", "import torch"], capture_output=True,
                              text=True, timeout=60)
    assert no_torch.returncode != 0 and "No module named 'torch'" in no_torch.stderr
    live = LiveServer(max_streams=2)
    out = tmp_path / "laptop.wav"
    try:
        r = subprocess.run([str(copy / ".venv" / "bin" / "csm-stream"), "--server", live.url,
                            "--token", TOKEN, "--text", "From the laptop.", "--max-audio-ms",
                            "800", "--output", str(out), "--no-dashboard"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=180)
    finally:
        live.close()
    assert r.returncode == 0, r.stderr[-3000:]
    assert sf.info(out).frames == 10 * 1920
