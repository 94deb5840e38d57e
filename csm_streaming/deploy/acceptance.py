"""The acceptance: the GPU tests, quantization and a server load test, then each goal against
what was measured, with one verdict each; the run fails on a goal missed or not measured.

Standard library only at import: it runs before the project's environment exists."""

from __future__ import annotations

import json
import time
from pathlib import Path

from csm_streaming.deploy.report import (
    _table,
    load_result,
    load_server_result,
    result_device,
    server_lines,
    spread_text,
)
from csm_streaming.deploy.runner import ROOT, VENV_PY, Runner

# (goal, bound, which side is good): the speed claims of the README, on the GPU they were
# made for
GOALS = {
    "step_over_floor": ("one stream's frame step <= 1.5x the bandwidth floor", 1.5, "max"),
    "frame_step_ms": ("one stream's frame step <= 80 ms (faster than the audio)", 80.0, "max"),
    "first_audio_ms": ("first audio <= 100 ms through csm-server (one client, warmed up)", 100.0,
                       "max"),
    "realtime_streams": (">= 128 clients of csm-server, every stream keeping up with playback "
                         "(p95 lateness <= 0; an H100)", 128, "min"),
    "int8_vs_bf16": ("int8 faster than bf16 per frame", 1.0, "min"),
    "int8_top1": ("int8's next codes agree with bf16's >= 90% (top-1; KL beside it)", 0.9, "min"),
}


# A run on a CPU is judged against bounds of its own (what a 2-core machine does), marked as
# such, so that it too can pass or fail: the GPU's bounds would fail every CPU run.
CPU_GOALS = {
    "step_over_floor": ("[CPU bound] one stream's frame step <= 1.5x the bandwidth floor", 1.5,
                        "max"),
    "frame_step_ms": ("[CPU bound] one stream's frame step <= 80 ms (faster than the audio)",
                      80.0, "max"),
    "first_audio_ms": ("[CPU bound] first audio <= 1500 ms through csm-server (one client)",
                       1500.0, "max"),
    "realtime_streams": ("[CPU bound] >= 1 client of csm-server keeping up with playback (p95 "
                         "lateness <= 0)", 1, "min"),
    "int8_vs_bf16": ("[CPU bound] int8 faster than bf16 per frame", 1.0, "min"),
    "int8_top1": ("int8's next codes agree with bf16's >= 90% (top-1; KL beside it)", 0.9, "min"),
}


# random:tiny on a CPU checks that the whole run works; these goals say nothing there
TINY_ON_CPU = {
    "step_over_floor": "random:tiny's step is bound by per-call overheads, not by the bytes of "
                       "its weights (frame_step_ms judges it)",
    "int8_vs_bf16": "random:tiny's layers are too small for int8 to pay (bench_quantize on "
                    "random:csm-1b measures it)",
    "int8_top1": "random:tiny's int8 agreement says nothing of csm-1b's (bench_quantize on "
                 "random:csm-1b measures it)",
}


VERDICTS = ("met", "NOT MET", "not measured", "not applicable")


FAILING = ("NOT MET", "not measured")  # the run exits non-zero on these


def step_acceptance(r: Runner, out: Path, model: str, device: str, quick: bool,
                    real_model: str | None = None) -> Path | None:
    """After --benchmark: the GPU test subset, bench_quantize, a server load test over HTTP,
    with real weights (`real_model`) the quality check, then a table of each goal against what
    was measured (JSON, PNG, report.md)."""
    r.say(f"== acceptance: {model} on {device}")
    py = str(VENV_PY)
    tests = r.run([py, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests/"],
                  check=False)
    r.run([py, "benchmarks/bench_quantize.py", "--model", model, "--device", device, "--modes",
           "bf16,int8", "--frames", "2" if quick else "3", "--quality-frames",
           "4" if quick else "50", "--out-dir", str(out)])
    # first audio and real-time streams: csm-server as users run it, over HTTP, 10 s streams
    r.run([py, "benchmarks/bench_server.py", "--model", model, "--device", device, "--clients",
           "1,2" if quick else "1,8,32,64,128", "--frames", "125",
           "--repeats", "1" if quick else "3", "--out-dir", str(out)])
    if real_model is not None:  # word error rate (Whisper) and clips that never end
        r.run([py, "benchmarks/bench_quality.py", "--model", real_model, "--device", device,
               "--out-dir", str(out)], check=False)
    if r.dry_run:
        return None
    rows = acceptance_rows(out, tests.stdout, device, model, real_weights=real_model is not None)
    path = out / "acceptance.json"
    path.write_text(json.dumps({"device": result_device(out), "model": model, "quick": quick,
                                "date": time.strftime("%Y-%m-%d %H:%M:%S"), "goals": rows},
                               indent=2))
    plot_acceptance(rows, out / "acceptance.png", result_device(out))
    report = out / "report.md"
    lines = [*server_lines(out), "## Acceptance", "",
             *_table(["goal", "bound", "measured (median (min-max, runs))", "verdict",
                      "measured by"],
                     [[g["goal"], "-" if g["bound"] is None else f"{g['bound']:g}",
                       _measured(g), g["verdict"], f"`{g['command']}`"] for g in rows]),
             f"Device: {result_device(out)}.", "",
             "![acceptance](acceptance.png)", ""]
    report.write_text(report.read_text() + "\n".join(lines) + "\n")
    for g in rows:
        r.say(f"  {g['goal']}: {_measured(g)}: {g['verdict']}")
    r.say(f"acceptance: {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return path


def _measured(goal: dict) -> str:
    """The figure, with its spread where its runs were kept: 'median (min-max, n runs)'."""
    if goal.get("summary"):
        return goal["summary"]
    if goal["measured"] is None:
        return "-"
    sp = goal.get("spread")
    return spread_text(goal["measured"], sp, ".3g") if sp else f"{goal['measured']:.3g}"


def acceptance_rows(out: Path, gpu_tests_output: str, device: str = "cuda",
                    model: str = "random:csm-1b", real_weights: bool = False) -> list[dict]:
    """Each goal with what the benchmarks in `out` measured and its verdict (VERDICTS): met or
    NOT MET against the bound for this device, "not measured" where it should have been and
    was not (a failure), "not applicable" where it cannot apply here (listed, not a failure)."""
    goals = CPU_GOALS if device == "cpu" else GOALS
    measured, spreads = measured_figures(out, device)
    frame = load_result(out, "frame_") or {}
    defect = (frame_row(frame, device) or {}).get("floor_defect")
    rows = []
    tiny = TINY_ON_CPU if device == "cpu" and model == "random:tiny" else {}
    for key, (goal, bound, kind) in goals.items():
        m = measured[key]
        met = None if m is None else (m <= bound if kind == "max" else m >= bound)
        row = {"key": key, "goal": goal, "bound": bound, "measured": m, "met": met,
               "spread": spreads.get(key)}
        if key == "int8_top1" and m is not None:
            row["summary"] = f"{m:.3f} (KL {measured['int8_kl']:.2e})"
        if key == "step_over_floor" and m is None and defect:
            row["summary"] = f"not measured: {defect}"
        rows.append(verdict(row, not_applicable=tiny.get(key)))
    rows += other_dtype_rows(frame, device, goals["step_over_floor"], tiny.get("step_over_floor"))
    rows += quality_rows(out, real_weights)
    rows.append(gpu_tests_row(gpu_tests_output, device))
    where = result_device(out)
    return [{**r, "command": GOAL_COMMANDS[r["key"].removesuffix(f"_{r.get('dtype')}")],
             "device": where} for r in rows]


def other_dtype_rows(frame: dict, device: str, goal: tuple, not_applicable: str | None
                     ) -> list[dict]:
    """The frame step against its floor for every other dtype bench_frame (`frame`, its
    result) measured eager, a row each, judged as the default dtype's (`goal`: its text, bound
    and side)."""
    default, (text, bound, _) = frame_row(frame, device) or {}, goal
    rows = []
    for r in frame.get("rows", []):
        if r.get("compiled") or r.get("dtype") == default.get("dtype"):
            continue
        m = None if r.get("floor_defect") else r.get("ours_median_ms", r["ours_ms"]) / r["floor_ms"]
        row = {"key": f"step_over_floor_{r['dtype']}", "dtype": r["dtype"], "bound": bound,
               "goal": f"{text} ({r['dtype']})", "measured": m,
               "met": None if m is None else m <= bound}
        if r.get("floor_defect"):
            row["summary"] = f"not measured: {r['floor_defect']}"
        rows.append(verdict(row, not_applicable=not_applicable))
    return rows


def verdict(row: dict, not_applicable: str | None = None) -> dict:
    """The row's verdict from its `met` (None: not measured) or the reason it cannot apply."""
    if not_applicable:
        return {**row, "verdict": "not applicable", "summary": f"not applicable: {not_applicable}"}
    return {**row, "verdict": {True: "met", False: "NOT MET", None: "not measured"}[row["met"]]}


# The command that measured each goal (the report names it)
GOAL_COMMANDS = {
    "step_over_floor": "benchmarks/bench_frame.py", "frame_step_ms": "benchmarks/bench_frame.py",
    "first_audio_ms": "benchmarks/bench_server.py",
    "realtime_streams": "benchmarks/bench_server.py",
    "int8_vs_bf16": "benchmarks/bench_quantize.py", "int8_top1": "benchmarks/bench_quantize.py",
    "wer": "benchmarks/bench_quality.py", "at_cap": "benchmarks/bench_quality.py",
    "wer_streaming": "benchmarks/bench_quality.py", "wer_int8": "benchmarks/bench_quality.py",
    "word_times": "benchmarks/bench_quality.py",
    "gpu_tests": "pytest -m gpu tests/",
}


def frame_row(frame: dict, device: str) -> dict | None:
    """The frame step of the dtype the product runs by default there (bf16 on a GPU, fp32 on a
    CPU), not the fastest of those measured."""
    rows = frame.get("rows") or []
    wanted = "fp32" if device == "cpu" else "bf16"
    return next((r for r in rows if r.get("dtype") == wanted), rows[0] if rows else None)


def measured_figures(out: Path, device: str = "cuda") -> tuple[dict, dict]:
    """Each goal's figure (the median of its runs where runs were kept) and, where kept, its
    spread {min, median, max, n}."""
    frame = load_result(out, "frame_") or {}
    quant = load_result(out, "quantize_") or {}
    measured, spreads = dict.fromkeys(GOALS), {}
    row = frame_row(frame, device)
    if row is not None:
        floor_ms = row["ours_ms"] / row["ours_over_floor"]
        sp = row.get("ours_spread_ms")
        measured["frame_step_ms"] = row.get("ours_median_ms", row["ours_ms"])
        if not row.get("floor_defect"):  # else the probes, not the step, were wrong
            measured["step_over_floor"] = measured["frame_step_ms"] / floor_ms
        if sp:
            spreads["frame_step_ms"] = sp
            spreads["step_over_floor"] = {k: v / floor_ms if k != "n" else v
                                          for k, v in sp.items()}
    # through csm-server over HTTP (bench_server's load run; not its isolation or Ray files)
    server = load_server_result(out) or {}
    runs = [r for r in server.get("rows", []) if "keeps_up" in r]
    one = [r for r in runs if r["clients"] == 1]
    if one:
        measured["first_audio_ms"] = one[0]["mean_ttfa_ms"]
        if (one[0].get("spread") or {}).get("mean_ttfa_ms"):
            spreads["first_audio_ms"] = one[0]["spread"]["mean_ttfa_ms"]
    if runs:  # every stream's 95th-percentile lateness against playback <= 0
        measured["realtime_streams"] = max([r["clients"] for r in runs if r["keeps_up"]] or [0])
    by_dtype = {r["dtype"]: r for r in quant.get("rows", [])}
    if "int8" in by_dtype and "bf16" in by_dtype:
        measured["int8_vs_bf16"] = by_dtype["bf16"]["ours_ms"] / by_dtype["int8"]["ours_ms"]
        measured["int8_top1"] = by_dtype["int8"].get("top1_mean")
        measured["int8_kl"] = by_dtype["int8"].get("kl_mean")
    return measured, spreads


# (goal key, goal, the figure in bench_quality's file, its upper bound): on real weights
QUALITY_GOALS = (
    ("wer", "word error rate of the streaming engine (Whisper, fixed sentences) <= 6%",
     "mean_wer", 0.06),
    ("wer_streaming", "streaming engine's word error rate <= 1.1x the plain loop's (same "
     "sentences and seeds)", "wer_streaming_vs_plain", 1.1),
    ("wer_int8", "int8's word error rate <= 1.2x the unquantized engine's", "wer_int8_vs_bf16",
     1.2),
    ("at_cap", "share of clips that never end = 0", "share_at_cap", 0.0),
    ("word_times", "voice-agent word starts (--word-aligner) within 150 ms of Whisper's word "
     "timestamps, on average", "word_start_error_ms_aligned", 150.0))


def quality_rows(out: Path, real_weights: bool = False) -> list[dict]:
    """Word error rate and clips that never end: bounded on real weights; with random ones
    (no quality step ran) not applicable; a quality step that ran and failed (or wrote
    nothing: it crashed) is not measured."""
    quality = load_result(out, "quality_")
    rows = []
    for key, goal, name, bound in QUALITY_GOALS:
        row = {"key": key, "goal": goal, "bound": bound, "measured": None, "met": None}
        if quality is None and real_weights:
            rows.append({**verdict(row), "summary": "not measured: bench_quality.py wrote no "
                         "result (it failed: see its output above)"})
            continue
        if quality is None:
            rows.append(verdict(row, not_applicable="random weights: nothing to understand"))
            continue
        m = quality.get(name)
        why = quality.get("skipped") or (quality.get("recogniser_unavailable")
                                         if key != "at_cap" else None)
        if key == "wer_int8" and m is None:
            why = why or quality.get("int8_unavailable")
        if key == "word_times" and m is None:
            why = why or quality.get("aligner_unavailable")
        row = {**row, "measured": m, "met": None if m is None else m <= bound}
        if key == "word_times" and m is not None:  # beside the estimate's, for what it buys
            estimate = quality.get("word_start_error_ms_estimate")
            row["summary"] = f"{m:.0f} ms" + (f" (the estimate: {estimate:.0f} ms)"
                                              if estimate is not None else "")
        rows.append({**verdict(row), **({"summary": f"not measured: {why}"} if why else {})})
    return rows


def gpu_tests_row(output: str, device: str) -> dict:
    """The equality tests on the device (pytest -m gpu): passed, failed, or not run."""
    ran = [line for line in output.splitlines() if " passed" in line
           or " skipped" in line or " failed" in line or "no tests ran" in line]
    summary = ran[-1].strip("= ") if ran else "no summary"
    failed = " failed" in summary or " error" in summary
    row = {"key": "gpu_tests", "goal": "the equality tests on this device (pytest -m gpu)",
           "bound": None, "measured": None, "summary": summary,
           "met": False if failed else (True if " passed" in summary else None)}
    if device == "cpu" and not failed:
        return {**verdict(row, not_applicable="no GPU here"), "summary": summary}
    return verdict(row)


def failing_goals(rows: list[dict]) -> list[str]:
    """The goals that make the run fail, each with its verdict and what was measured."""
    return [f"{g['goal']}: {g['verdict']} ({_measured(g)})" for g in rows
            if g["verdict"] in FAILING]


def plot_acceptance(rows: list[dict], path: Path, device: str):
    """Measured over goal, per goal (1 is the goal; which side is good is in the label)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [g for g in rows if g["measured"] is not None and g["bound"]]
    fig, ax = plt.subplots(figsize=(8, 0.6 + 0.6 * max(1, len(shown))))
    ratios = [g["measured"] / g["bound"] for g in shown]
    ax.barh([g["goal"] for g in shown], ratios,
            color=["tab:green" if g["met"] else "tab:red" for g in shown])
    ax.axvline(1.0, c="k", ls=":")
    ax.set(xscale="log", xlabel="measured / goal (log)", title=f"Acceptance on {device}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
