"""deploy_vast.py on this machine (no GPU): info, a dry-run setup, a tiny benchmark, no leaks."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks.common import slug

ROOT = Path(__file__).resolve().parent.parent


def deploy(*args, env=None, timeout=900):
    return subprocess.run(
        [sys.executable, str(ROOT / "deploy_vast.py"), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
    )


def test_info_says_what_the_box_can_do():
    r = deploy("--info")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "disk free:" in out and "memory free:" in out and "torch: 2." in out
    if shutil.which("nvidia-smi") is None:
        assert "GPU: none found" in out and "no GPU: CSM-1B runs on the CPU" in out


def test_setup_dry_run_prints_the_readme_install_and_runs_nothing():
    r = deploy("--setup", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "(dry run" in r.stdout and "$ bash setup.sh" in r.stdout
    assert "torch.cuda.is_available()" in r.stdout
    # the CUDA check was printed, not run: none of its output lines is there
    assert not any(
        line.startswith(("CUDA works:", "CUDA is not available")) for line in r.stdout.splitlines()
    )


def test_secrets_never_reach_the_output():
    secret = "hf_thisIsASecretToken123"
    r = deploy("--download", "--dry-run", env={"HF_TOKEN": secret})
    assert r.returncode == 0 and secret not in r.stdout + r.stderr
    assert "using HF_TOKEN" in r.stdout
    r = deploy("--serve", "--dry-run", "--model", "random:tiny", "--token", "serverSecret987")
    assert r.returncode == 0 and "serverSecret987" not in r.stdout + r.stderr
    assert "stream slots" in r.stdout and "--max-streams 2" in r.stdout
    r = deploy("--serve", "--dry-run", "--model", "random:tiny", "--replicas", "2")
    assert r.returncode == 0 and "$ " in r.stdout
    assert "csm_streaming.server.ray_serve --replicas 2" in r.stdout
    assert "x 2 replicas (Ray Serve)" in r.stdout


def test_no_step_is_an_error():
    r = deploy()
    assert r.returncode == 2


def test_the_acceptance_runs_here_on_the_tiny_model_and_writes_its_results():
    """--all --local --model random:tiny: the whole acceptance (benchmarks, the GPU test
    subset, quantization, a server load test, goal vs measured) on this CPU, as on a GPU."""
    before = set((ROOT / "results").glob("*")) if (ROOT / "results").exists() else set()
    r = deploy("--all", "--local", "--model", "random:tiny", "--device", "cpu")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    new = sorted(set((ROOT / "results").glob("*")) - before)
    assert len(new) == 1
    out = new[0]
    try:
        names = {p.name for p in out.iterdir()}
        cpu = slug(torch.device("cpu"))  # the CPU named: cpu-amd-epyc, cpu-intel-xeon, ...
        assert cpu.startswith("cpu-")
        assert {f"frame_{cpu}.json", f"streaming_{cpu}.json", f"streaming_{cpu}.png",
                f"watermark_{cpu}.json", "report.md"} <= names
        frame = json.loads((out / f"frame_{cpu}.json").read_text())
        assert frame["model"] == "random:tiny" and frame["rows"][0]["ours_ms"] > 0
        report = (out / "report.md").read_text()
        assert frame["device"] in report and "## Frame step" in report and "## Streaming" in report
        assert f"![streaming](streaming_{cpu}.png)" in report and "| frame step alone |" in report
        # each figure with its spread and number of runs, right plurals, then the checks
        assert "| 1 stream | 1 |" in report and "1 streams" not in report
        assert ", 2 runs)" in report and "## Checks" in report
        # goal vs measured, each goal with a verdict that follows from its number
        acceptance = json.loads((out / "acceptance.json").read_text())
        goals = {g["key"]: g for g in acceptance["goals"]}
        assert set(goals) == {"step_over_floor", "first_audio_ms", "realtime_streams",
                              "int8_vs_bf16", "gpu_tests"}
        for g in goals.values():
            if g["measured"] is not None:
                within = (g["measured"] <= g["bound"] if g["key"] in ("step_over_floor",
                                                                       "first_audio_ms")
                          else g["measured"] >= g["bound"])
                assert g["met"] == within, g
        assert goals["realtime_streams"]["measured"] in (0, 1, 2)  # the streams swept here
        assert "skipped" in goals["gpu_tests"]["summary"] and goals["gpu_tests"]["met"] is None
        assert "## Acceptance" in report and "acceptance.png" in names
        assert {f"quantize_{cpu}.json", f"server_{cpu}.json"} <= names
    finally:
        shutil.rmtree(out)
        if not before:
            shutil.rmtree(ROOT / "results", ignore_errors=True)


def test_the_report_names_figures_that_contradict_each_other():
    from deploy_vast import contradictions

    def streams(n, fps, runs=(1.0, 1.0)):
        return {"name": f"{n} stream{'s' * (n != 1)}", "kind": "streams", "streams": n,
                "aggregate_frames_per_s": fps,
                "spread": {"aggregate_frames_per_s": {"min": fps * runs[0], "median": fps,
                                                      "max": fps * runs[1], "n": 3}}}

    frame = {"rows": [{"dtype": "fp32", "ours_ms": 10.0}, {"dtype": "bf16", "ours_ms": 8.0}]}
    wm = {"rows": [{"window_ms": 2000, "ms_per_audio_s": 280}]}
    calm = {"rows": [streams(1, 10), streams(4, 30), streams(8, 50)]}
    assert contradictions(frame, calm, wm, on_cpu=True) == []
    slower = {"rows": [streams(1, 10), streams(4, 6)]}
    assert any("4 streams make fewer frames per second than 1 stream" in w
               for w in contradictions(None, slower, None, on_cpu=True))
    far = {"rows": [{"dtype": "fp32", "ours_ms": 1198.0}, {"dtype": "bf16", "ours_ms": 61.0}]}
    assert any("19.6x the bf16 step" in w for w in contradictions(far, None, None, on_cpu=True))
    costly = {"rows": [{"window_ms": 2000, "ms_per_audio_s": 3900}]}
    assert any("13.0x the README" in w for w in contradictions(None, None, costly, on_cpu=True))
    assert contradictions(None, None, costly, on_cpu=False) == []  # the figure is a CPU's
    noisy = {"rows": [streams(1, 10, runs=(0.5, 1.2))]}
    assert any("varies 2.4x over 3 runs" in w
               for w in contradictions(None, noisy, None, on_cpu=True))


def test_word_error_rate_counts_edits_per_reference_word():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_quality import word_error_rate

    assert word_error_rate("The cat sat.", "the cat sat") == 0.0  # case and punctuation
    assert word_error_rate("the cat sat", "the cat sat down") == 1 / 3  # an insertion
    assert word_error_rate("the cat sat", "the dog sat") == 1 / 3  # a substitution
    assert word_error_rate("the cat sat on it", "cat on") == 3 / 5  # deletions
    assert word_error_rate("hello there", "") == 1.0


def test_the_quality_check_says_what_it_cannot_measure_and_goes_on(hf_checkpoint, tmp_path):
    """Real-format weights (tiny, random), offline: no Whisper can be fetched, so the word
    error rate is said to be unmeasured, and the length caps are still counted; random:
    weights are refused with the reason."""
    _, folder = hf_checkpoint
    bench = [sys.executable, str(ROOT / "benchmarks" / "bench_quality.py"), "--device", "cpu",
             "--out-dir", str(tmp_path)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run(bench + ["--model", str(folder), "--mimi", "random", "--no-watermark",
                                "--sentences", "2", "--max-audio-ms", "240"],
                       capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "could not be loaded" in r.stdout and "the length caps are" in r.stdout
    result = json.loads(next(tmp_path.glob("quality_*.json")).read_text())
    assert result["recogniser_unavailable"] and "mean_wer" not in result
    assert len(result["rows"]) == 2 and result["share_at_cap"] == 1.0  # random never ends
    r = subprocess.run(bench + ["--model", "random:tiny"], capture_output=True, text=True,
                       timeout=300, env=env, cwd=ROOT)
    assert r.returncode == 0 and "needs real weights" in r.stdout
