"""A second compiled start finds its graphs in inductor's caches: an int8 model over FBGEMM's
kernel compiles without freezing, and its graphs must come out the same in every process (the
layers' numbers, which the graphs call FBGEMM's product by, given in the model's order, not in
the order two threads happened to pack them) and whole (no graph breaks)."""

import json
import os
import subprocess
import sys

import pytest

from csm_streaming.model.quantize import fbgemm_available

START = """
import json
from torch._dynamo.utils import counters
from csm_streaming.engine.config import StreamingConfig
from csm_streaming.engine.loader import load_streaming_csm_1b
from csm_streaming.model import quantized_load
quantized_load.build_workers = lambda: 2  # layers built and packed two at a time
load_streaming_csm_1b("cpu", StreamingConfig(enable_compilation=True), model="random:tiny",
                      quantize="int8", watermark=False)
print(json.dumps({k: dict(counters[k]) for k in ("inductor", "aot_autograd", "graph_break")}))
"""


@pytest.mark.skipif(not fbgemm_available(), reason="FBGEMM is x86 only")
def test_a_second_compiled_int8_start_reads_every_graph_from_the_caches(tmp_path):
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"),
           "CSM_INT8_KERNEL": "fbgemm", "CSM_CACHE_DIR": str(tmp_path / "weights")}

    def start():
        r = subprocess.run([sys.executable, "-c", START], env=env, capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        return json.loads(r.stdout.strip().splitlines()[-1])

    first, second = start(), start()  # the second reads the int8 weights from the cache too
    assert first["graph_break"] == {} and second["graph_break"] == {}
    graphs = first["aot_autograd"]["total"]
    assert graphs >= 3 and first["inductor"]["fxgraph_cache_miss"] == graphs
    assert second["aot_autograd"] == {"total": graphs, "autograd_cache_hit": graphs, "ok": graphs}
    assert second["inductor"].get("fxgraph_cache_miss", 0) == 0
    assert second["inductor"]["fxgraph_cache_hit"] == graphs
