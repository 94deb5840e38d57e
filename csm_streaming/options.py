"""Command-line flags of the tools that load the model (csm-stream, csm-server, and
the Ray Serve replicas through csm-server): one definition, one meaning. No torch at import."""

from __future__ import annotations

import argparse


def add_model_arguments(p):
    """The model, where it runs and how: flags to a parser or an argument group."""
    p.add_argument("--model", default=None,
                   help="hub repo, local folder or file, or random:tiny / random:csm-1b "
                        "(None: the ungated CSM-1B copy)")
    p.add_argument("--mimi", default=None, help="Mimi weights: a file, a repo, or 'random'")
    p.add_argument("--device", default="auto", help="auto, cuda, mps or cpu")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default=None,
                   help="weights' dtype (None: bf16 on CUDA, fp32 elsewhere; auto: on a CPU the "
                        "fastest of fp32, bf16 and, with --quantize int8, int8, measured at "
                        "start)")
    p.add_argument("--quantize", choices=["int8", "int4"], default=None,
                   help="int8 / int4 weights (int4: CPU only); see the README")
    p.add_argument("--no-weight-cache", action="store_true",
                   help="do not keep int8 weights on disk for the next start, nor read them "
                        "(kept in CSM_CACHE_DIR, else ~/.cache/csm_streaming: 2.3 GB for CSM-1B)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the frame step (None: on CUDA only; minutes on a CPU)")
    p.add_argument("--no-cuda-graphs", action="store_true",
                   help="do not capture the frame step in CUDA graphs")
    p.add_argument("--no-watermark", action="store_true",
                   help="do not watermark the audio (please keep it on)")
    p.add_argument("--watermark-key", default=None,
                   help="private key: five integers 0..255, comma-separated")


def load_arguments(args) -> dict:
    """What those flags say, as keyword arguments of load_streaming_csm_1b."""
    from csm_streaming.model.hub import DEFAULT_REPO

    return {"device": args.device, "model": args.model or DEFAULT_REPO, "mimi": args.mimi,
            "watermark": not args.no_watermark, "watermark_key": args.watermark_key,
            "quantize": args.quantize, "dtype": args.dtype,
            "weight_cache": not args.no_weight_cache}


def config_arguments(args) -> dict:
    """What they say of the StreamingConfig."""
    return {"enable_compilation": args.compile, "enable_cuda_graphs": not args.no_cuda_graphs}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each default shown once: appended as '(default: X)' unless the help already says what
    happens without the flag ('(default ...' or '(None: ...'), or there is nothing to show."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "(default" in text or "(None:" in text or action.default in (None, False, []):
            return text
        return super()._get_help_string(action)
