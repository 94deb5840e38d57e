"""CSM-1B on Ray Serve: one engine per replica (one GPU each), the server's routes in front.

    python -m csm_streaming.server.ray_serve --replicas 4 --host 0.0.0.0   # 4 GPUs, one box
    serve run serve_config.yaml                                         # autoscaled, a cluster

Each replica is the whole server of app.py (the same FastAPI routes, built by
server.create_app around the replica's own engine thread): the OpenAI speech route, the
WebSocket, /api/generate, chat, /health and /metrics (that replica's, labelled `replica`; Ray
exports Serve's own metrics for the whole cluster). Serve routes a request to a replica with a
free slot (max_ongoing_requests = the engine's slots) and queues it otherwise (up to
max_queued_requests, then 503); it replaces a replica that dies, whose clients see their
stream cut (never a clean end), and scales the replica count on ongoing requests.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from ray import serve

from csm_streaming.options import HelpFormatter

log = logging.getLogger("csm.ray")


@serve.ingress()
class CSMReplica:
    """One engine, its engine thread and the server's app around them."""

    def __init__(self, server_args: list[str], torch_threads: int | None = None):
        import torch

        from csm_streaming.chat.llm import LLMConfig
        from csm_streaming.engine.voices import DEFAULT_VOICES_DIR, VoiceLibrary
        from csm_streaming.server.app import build_parser, load_engine_thread, settings_from_args

        if torch_threads:
            torch.set_num_threads(torch_threads)
        args = build_parser().parse_args(server_args)
        ctx = serve.get_replica_context()
        self.replica = ctx.replica_tag if ctx is not None else "local"
        self.engine_thread = load_engine_thread(args, replica=self.replica).start()
        self.settings = settings_from_args(args)
        self.voices = VoiceLibrary.load(args.voices_dir or DEFAULT_VOICES_DIR,
                                        self.engine_thread.generator.generator,
                                        must_exist=args.voices_dir is not None)
        self.chat = LLMConfig.from_env(args.llm, model=args.llm_model) if args.llm else None
        log.info("replica %s ready on %s", self.replica, self.engine_thread.generator.device)

    def __serve_build_asgi_app__(self):
        from csm_streaming.server.app import create_app

        return create_app(self.engine_thread, self.settings, voices=self.voices, chat=self.chat)

    def check_health(self):
        """Serve calls this periodically: a replica whose engine thread died is replaced."""
        if not self.engine_thread._thread.is_alive():
            raise RuntimeError(f"replica {self.replica}: the engine thread stopped")

    def __del__(self):
        engine_thread = getattr(self, "engine_thread", None)
        if engine_thread is not None:
            engine_thread.stop(timeout=5)


def build_app(options: dict):
    """The Serve application (`import_path: csm_streaming.server.ray_serve:build_app` in
    serve_config.yaml).

    options: server_args (list, csm-server's flags), replicas or autoscaling
    ({min_replicas, max_replicas, target_ongoing_requests}), gpus_per_replica, cpus_per_replica,
    max_streams (the engine's slots: Serve's max_ongoing_requests), max_queued, torch_threads.
    """
    server_args = list(options.get("server_args", []))
    streams = int(options.get("max_streams", 8))
    if "--max-streams" not in server_args:
        server_args += ["--max-streams", str(streams)]
    scaling = ({"autoscaling_config": options["autoscaling"]} if options.get("autoscaling")
               else {"num_replicas": int(options.get("replicas", 1))})
    deployment = serve.deployment(CSMReplica).options(
        max_ongoing_requests=streams,
        max_queued_requests=int(options.get("max_queued", streams * 4)),
        ray_actor_options={"num_gpus": float(options.get("gpus_per_replica", 0)),
                           "num_cpus": float(options.get("cpus_per_replica", 1))},
        health_check_period_s=5, graceful_shutdown_timeout_s=10, **scaling)
    return deployment.bind(server_args, options.get("torch_threads"))


ROOT = os.path.dirname(os.path.abspath(__file__))


def runtime_env(remote: bool) -> dict:
    """How replicas find the project: on this machine, its folder on their path; on a cluster,
    the folder shipped to every node (weights and environments are not: install with
    setup.sh on each node)."""
    if remote:
        return {"working_dir": ROOT, "excludes": [".venv", ".git", "results", "benchmarks/results"]}
    return {"env_vars": {"PYTHONPATH": ROOT}}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Serve CSM-1B on Ray Serve: replicas of the server, one engine (GPU) each. "
                    "Flags not listed here go to each replica's server (see csm-server --help).",
        formatter_class=HelpFormatter)
    p.add_argument("--replicas", type=int, default=None,
                   help="fixed replica count (None: one per GPU Ray sees, at least one)")
    p.add_argument("--max-replicas", type=int, default=None,
                   help="autoscale between 1 and this many replicas on ongoing requests")
    p.add_argument("--max-streams", type=int, default=8, help="engine slots per replica")
    p.add_argument("--host", default="127.0.0.1", help="address the Serve proxy binds")
    p.add_argument("--port", type=int, default=8000, help="port of the Serve proxy")
    p.add_argument("--address", default=None, help="a running Ray cluster (None: start one here)")
    return p


def main(argv=None) -> int:
    import ray

    args, server_args = build_parser().parse_known_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ray.init(address=args.address, runtime_env=runtime_env(remote=args.address is not None))
    gpus = int(ray.cluster_resources().get("GPU", 0))
    options = {"server_args": server_args, "max_streams": args.max_streams,
               "gpus_per_replica": 1 if gpus else 0}
    if args.max_replicas:
        options["autoscaling"] = {"min_replicas": 1, "max_replicas": args.max_replicas,
                                  "target_ongoing_requests": max(1, args.max_streams * 3 // 4)}
    else:
        options["replicas"] = args.replicas or max(1, gpus)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(build_app(options), name="csm", route_prefix="/", blocking=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
