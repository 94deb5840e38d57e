"""The benchmark report (report.md): each figure with its spread, and figures that cannot
all be right.

Standard library only at import: it runs before the project's environment exists."""

from __future__ import annotations

import json
import time
from pathlib import Path


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(r) + " |" for r in rows), ""]


def _spread(row: dict, key: str, fmt: str = ".0f", spread_key: str | None = None) -> str:
    """A figure as 'median (min-max, n runs)' when its runs were kept, else the figure."""
    sp = (row.get("spread") or {}).get(key) or row.get(spread_key or "")
    if not sp:
        return format(row[key], fmt)
    return spread_text(sp["median"], sp, fmt)


def spread_text(value: float, sp: dict, fmt: str = ".0f") -> str:
    """'value (min-max, n runs)' of a spread {min, median, max, n}."""
    runs = "1 run" if sp["n"] == 1 else f"{sp['n']} runs"
    return f"{value:{fmt}} ({sp['min']:{fmt}}-{sp['max']:{fmt}}, {runs})"


WATERMARK_MS_PER_AUDIO_S_CPU = 300  # the README's figure for a 2-core CPU


def contradictions(frame: dict | None, streaming: dict | None, wm: dict | None,
                   on_cpu: bool) -> list[str]:
    """Figures that cannot all be right, or that are far from what the README says: a busy
    machine, a broken install or a regression. Each is one line to read before trusting the
    report."""
    found = []
    rows = sorted((r for r in (streaming or {}).get("rows", []) if r.get("kind") == "streams"),
                  key=lambda r: r["streams"])
    for fewer, more in zip(rows, rows[1:]):
        if more["aggregate_frames_per_s"] < 0.95 * fewer["aggregate_frames_per_s"]:
            found.append(f"{more['name']} make fewer frames per second than {fewer['name']} "
                         f"({more['aggregate_frames_per_s']:.1f} vs "
                         f"{fewer['aggregate_frames_per_s']:.1f}): batching should never lose")
    found += [f"{r['dtype']}: {r['floor_defect']}" for r in (frame or {}).get("rows", [])
              if r.get("floor_defect")]
    steps = {r["dtype"]: r["ours_ms"] for r in (frame or {}).get("rows", [])}
    if "fp32" in steps and "bf16" in steps:
        ratio = steps["fp32"] / steps["bf16"]
        if not 1 / 3 <= ratio <= 3:
            found.append(f"the fp32 step is {ratio:.1f}x the bf16 step ({steps['fp32']:.1f} vs "
                         f"{steps['bf16']:.1f} ms): expected within 3x either way")
    for r in (wm or {}).get("rows", []):
        if on_cpu and r["window_ms"] == 2000:
            ratio = r["ms_per_audio_s"] / WATERMARK_MS_PER_AUDIO_S_CPU
            if not 1 / 3 <= ratio <= 3:
                found.append(f"the watermark costs {r['ms_per_audio_s']:.0f} ms per audio "
                             f"second, {ratio:.1f}x the README's {WATERMARK_MS_PER_AUDIO_S_CPU}")
    for source in (frame, streaming, wm):
        for r in (source or {}).get("rows", []):
            spreads = dict(r.get("spread") or {})
            if r.get("ours_spread_ms"):
                spreads["ours_ms"] = r["ours_spread_ms"]
            for key, sp in spreads.items():
                if sp["n"] > 1 and sp["min"] > 0 and sp["max"] > 1.5 * sp["min"]:
                    found.append(f"{r.get('name') or r.get('dtype') or r.get('window_ms')}: "
                                 f"{key} varies {sp['max'] / sp['min']:.1f}x over {sp['n']} runs "
                                 "(a busy machine?)")
    return found


def _bandwidth_text(frame: dict) -> str:
    """The probes the floor came from: DRAM, and the cache where one was measured."""
    text = f"DRAM read {frame['bandwidth_gb_s']:.1f} GB/s"
    if frame.get("llc_bytes"):
        text += (f"; last-level cache ({frame['llc_bytes'] / 2**20:g} MiB) read "
                 f"{frame['cache_gb_s']:.1f} GB/s, {frame['usable_cache_bytes'] / 2**20:g} MiB "
                 "of it at >= 1.5x DRAM")
    return text + "."


def _in_cache(row: dict) -> str:
    """Whether one depth step's weights fit in the usable cache (the floor reads them there)."""
    if "depth_step_in_cache" not in row:
        return "-"
    return f"{'yes' if row['depth_step_in_cache'] else 'no'} ({row['depth_step_mb']:.0f} MB)"


def write_report(out: Path, info: dict, model: str) -> Path:
    """A short markdown report of the JSON the benchmarks wrote: each figure with its spread
    where the benchmark kept its runs, then the figures that contradict each other."""
    gpu = info["gpus"][0] if info["gpus"] else None
    box = f", {gpu['name']} ({gpu['memory_total_gb']:.0f} GB)" if gpu else ""
    lines = [f"# CSM-1B benchmark on {result_device(out)}", "",
             f"Model: {model} (random weights: speed does not depend on their values). "
             f"Date: {time.strftime('%Y-%m-%d %H:%M')}. Box: {info['cpu_count']} CPUs{box}.", ""]
    frame = load_result(out, "frame_")
    if frame:
        lines += ["## Frame step", "", _bandwidth_text(frame), ""]
        lines += _table(["dtype", "depth step in cache", "floor ms", "ours ms", "plain loop ms",
                         "ours / floor", "RTF"],
                        [[r["dtype"], _in_cache(r), f"{r['floor_ms']:.1f}",
                          _spread(r, "ours_ms", ".1f", "ours_spread_ms"),
                          f"{r['plain_ms']:.1f}", f"{r['ours_over_floor']:.2f}",
                          f"{r['ours_rtf']:.3f}"] for r in frame["rows"]])
    streaming = load_result(out, "streaming_")
    if streaming:
        runs = [r for r in streaming["rows"] if "step_ms" not in r]
        steps = [r for r in streaming["rows"] if "step_ms" in r]
        lines += ["## Streaming", ""]
        lines += _table(["run", "streams", "first audio ms", "RTF per stream", "frames/s (all)"],
                        [[r["name"], str(r["streams"]), _spread(r, "ttfa_ms"),
                          _spread(r, "rtf_per_stream", ".3f"),
                          _spread(r, "aggregate_frames_per_s", ".2f")] for r in runs])
        if steps:
            lines += _table(["frame step alone", "ms", "frames/s (all)", "vs 1 stream"],
                            [[r["name"].removeprefix("frame step, "), _spread(r, "step_ms", ".1f"),
                              f"{r['aggregate_frames_per_s']:.2f}",
                              f"{r['aggregate_vs_1_stream']:.2f}x"] for r in steps])
        lines += [f"![streaming]({p.name})" for p in sorted(out.glob("streaming_*.png"))] + [""]
    wm = load_result(out, "watermark_")
    if wm:
        lines += ["## Watermark", "",
                  f"Added to the first audio: {wm['first_chunk_added_latency_ms']:.0f} ms.", ""]
        lines += _table(["window ms", "mark ms", "ms per audio second"],
                        [[str(r["window_ms"]), _spread(r, "mark_ms"), f"{r['ms_per_audio_s']:.0f}"]
                         for r in wm["rows"]])
    warnings = contradictions(frame, streaming, wm, on_cpu=gpu is None)
    lines += ["## Checks", ""] + ([f"- warning: {w}" for w in warnings] or
                                  ["- no figure contradicts another"]) + [""]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    for w in warnings:
        print(f"warning: {w}")
    return path


def load_result(out: Path, prefix: str) -> dict | None:
    files = sorted(out.glob(f"{prefix}*.json"))
    return json.loads(files[0].read_text()) if files else None


def server_lines(out: Path) -> list[str]:
    """bench_server's load run through csm-server, as report lines (none without it)."""
    server = load_server_result(out)
    if not server:
        return []
    return ["## Through csm-server", "",
            f"{server.get('server', 'csm-server')}, {server['frames']} frames a stream; "
            f"real-time streams: {server['realtime_streams']} (every stream's "
            "95th-percentile lateness against playback <= 0).", "",
            *_table(["clients", "first audio ms (mean)", "p95 lateness ms (worst stream)",
                     "keeps up", "audio s / s (all)"],
                    [[str(r["clients"]), _spread(r, "mean_ttfa_ms"),
                      _spread(r, "p95_lateness_ms"), "yes" if r["keeps_up"] else "no",
                      _spread(r, "aggregate_audio_s_per_s", ".2f")] for r in server["rows"]])]


def load_server_result(out: Path) -> dict | None:
    """bench_server's load run through csm-server (not its isolation or Ray Serve files)."""
    loads = (json.loads(f.read_text()) for f in sorted(out.glob("server_*.json")))
    return next((d for d in loads if "realtime_streams" in d), None)


def result_device(out: Path) -> str:
    for f in sorted(out.glob("*.json")):
        return json.loads(f.read_text()).get("device", "unknown device")
    return "unknown device"
