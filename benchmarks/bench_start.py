"""How fast and how small a start is: load (and, compiled, warm up) a setting in a fresh process.

    .venv/bin/python benchmarks/bench_start.py [--model random:csm-1b] [--quantize int8]
    .venv/bin/python benchmarks/bench_start.py --quantize int8 --compile

Each row is one fresh Python process that loads the model as `csm-stream` does and, with
--compile, warms the engine up (the compiled step built): the seconds until it is ready and the
process's peak resident memory (GB: 10^9 bytes), and the int8 kernel its load picked by timing
(oneDNN's packed weights take less memory than FBGEMM's). Rows, in one run:

- "quantized as written": the model's layers quantized as its weights are written (the
  product's way: model/quantized_load.build_quantized), no weight cache, beside
- "fp32, then quantized" (the baseline: the whole fp32 model built first, then quantized, as
  the product did before), then
- "weights cached: written" and "weights cached: read": two starts over one empty weight
  cache folder (model/weight_cache.py): the first quantizes and keeps the int8 weights, the
  second reads them; and, with --compile,
- "compiled, cold" then "compiled, cached": two starts with an empty inductor cache folder and
  an empty weight cache of their own, so the second finds the first's compiled graphs and
  int8 weights on disk.

Prints a table and saves benchmarks/results/start_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

from common import add_model_argument, device_name, print_table, save_json
from csm_streaming.options import HelpFormatter

CHILD_FLAG = "--child"


def child(model: str, quantize: str, after_fp32: bool, compile_: bool, weight_cache: bool):
    """One start, measured from inside the process: prints its JSON line."""
    import resource

    t0 = time.perf_counter()
    from csm_streaming.engine.config import StreamingConfig
    from csm_streaming.engine.loader import load_streaming_csm_1b
    from csm_streaming.model import checkpoints
    from csm_streaming.model import quantize as quantize_module

    if after_fp32:  # the baseline: the model built whole in fp32, then quantized
        build = checkpoints.build_model

        def build_then_quantize(args, state, device, dtype, quantize=None):
            model = build(args, state, device, dtype)
            if quantize:
                quantize_module.quantize_model(model, quantize)
            return model
        checkpoints.build_model = build_then_quantize
    sg = load_streaming_csm_1b("cpu", StreamingConfig(enable_compilation=compile_), model=model,
                               quantize=quantize, watermark=False, weight_cache=weight_cache)
    ready = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    kernel = next((m.cpu_kernel for m in sg.generator.model.modules()
                   if isinstance(m, quantize_module.Int8Linear)), None)
    print(json.dumps({"ready_s": ready, "warmup_s": sg.warmup_s, "peak_rss_gb": peak / 1e9,
                      "compiled": sg.engine.compiled is not None, "int8_kernel": kernel}))


def start(args, name: str, env: dict, after_fp32: bool = False, compile_: bool = False,
          weight_cache: bool = False) -> dict:
    """One start in a fresh process; `env` says where its caches are."""
    cmd = [sys.executable, __file__, CHILD_FLAG, args.model, args.quantize,
           *("1" if flag else "0" for flag in (after_fp32, compile_, weight_cache))]
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if r.returncode != 0:
        raise RuntimeError(f"{name}: the start failed:\n{r.stderr[-3000:]}")
    row = {"name": name, **json.loads(r.stdout.strip().splitlines()[-1]),
           "process_s": time.perf_counter() - t}
    print(f"{name}: ready in {row['ready_s']:.1f} s, peak {row['peak_rss_gb']:.2f} GB", flush=True)
    return row


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    add_model_argument(p)
    p.add_argument("--quantize", default="int8", choices=("int8", "int4"))
    p.add_argument("--compile", action="store_true",
                   help="also two compiled starts over one fresh inductor cache (cold, cached)")
    p.add_argument("--out-dir", default=None,
                   help="where the JSON goes (default benchmarks/results)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    rows = [start(args, "quantized as written", env),
            start(args, "fp32, then quantized", env, after_fp32=True)]
    with tempfile.TemporaryDirectory(prefix="csm-weights-") as weights:
        cached_env = {**env, "CSM_CACHE_DIR": weights}
        rows += [start(args, "weights cached: written", cached_env, weight_cache=True),
                 start(args, "weights cached: read", cached_env, weight_cache=True)]
    if args.compile:
        with (tempfile.TemporaryDirectory(prefix="csm-inductor-") as graphs,
              tempfile.TemporaryDirectory(prefix="csm-weights-") as weights):
            cached_env = {**env, "TORCHINDUCTOR_CACHE_DIR": graphs, "CSM_CACHE_DIR": weights}
            rows += [start(args, "compiled, cold", cached_env, compile_=True, weight_cache=True),
                     start(args, "compiled, cached", cached_env, compile_=True,
                           weight_cache=True)]
    base = rows[1]
    for r in rows:
        r["rss_vs_fp32_first"] = r["peak_rss_gb"] / base["peak_rss_gb"]
    print_table(rows, ["name", "ready_s", "warmup_s", "peak_rss_gb", "rss_vs_fp32_first",
                       "compiled", "int8_kernel"])
    device = torch.device("cpu")
    print(f"device: {device_name(device)}")
    save_json("start", device, {"model": args.model, "quantize": args.quantize,
                                "rows": rows}, args.out_dir)


if __name__ == "__main__":
    if len(sys.argv) == 7 and sys.argv[1] == CHILD_FLAG:
        child(sys.argv[2], sys.argv[3], *(flag == "1" for flag in sys.argv[4:]))
    else:
        main()
