"""Loading CSM-1B: `load_csm_1b` (upstream's name) for the reference Generator,
`load_streaming_csm_1b` for the streaming front; the device and dtype chosen for this machine.

    gen = load_streaming_csm_1b(device="auto", model="random:tiny")
"""

from __future__ import annotations

import logging

import torch

from csm_streaming.engine.config import LoadOptions, StreamingConfig
from csm_streaming.engine.frontend import StreamingGenerator
from csm_streaming.engine.reference import Generator
from csm_streaming.metrics import DEVICE_FALLBACK, Event
from csm_streaming.model.checkpoints import default_dtype, load_mimi, load_model_and_tokenizer
from csm_streaming.model.hub import DEFAULT_REPO, CheckpointError, is_random_model

log = logging.getLogger("csm")


def load_csm_1b(device: str = "auto", model: str = DEFAULT_REPO, **options) -> Generator:
    """Load CSM-1B and Mimi and return a Generator. options: the fields of LoadOptions (mimi,
    dtype, quantize, weight_cache, watermark, watermark_key, allow_cpu_fallback, normalize)."""
    return load_generator(device, LoadOptions(model=model, **options))


def load_generator(device: str, opts: LoadOptions) -> Generator:
    """load_csm_1b with its options as one object (see LoadOptions)."""
    from csm_streaming.model.quantize import MODES, check_mode
    from csm_streaming.model.watermark import load_watermark_stage

    dtype, quantize = opts.dtype, opts.quantize
    if isinstance(dtype, str):
        if dtype not in (*MODES, *DTYPE_NAMES, "auto"):
            raise ValueError(f"dtype: a torch.dtype, or one of {', '.join(DTYPE_NAMES)}, auto, "
                             f"{', '.join(MODES)} (got {dtype!r})")
        if dtype in MODES:
            dtype, quantize = None, dtype
        else:
            dtype = DTYPE_NAMES.get(dtype, dtype)

    random_model = is_random_model(opts.model)
    events = []
    try:
        dev = pick_device(device)
        if dtype == "auto":
            dtype, quantize = pick_dtype(dev, quantize)
        check_mode(quantize, dev)  # before the weights load: int4 on a GPU says so now
        csm, tok, _ = load_model_and_tokenizer(opts.model, dev, dtype, quantize,
                                               opts.weight_cache)
    except (RuntimeError, torch.OutOfMemoryError) as e:
        if isinstance(e, CheckpointError) or not opts.allow_cpu_fallback or str(device) == "cpu":
            raise
        events.append(Event(DEVICE_FALLBACK, f"device '{device}' failed ({e}): falling back to "
                                             "the CPU"))
        log.warning(events[-1].text)
        dev = torch.device("cpu")
        csm, tok, _ = load_model_and_tokenizer(opts.model, dev, None, quantize,
                                               opts.weight_cache)
    mimi = "random" if opts.mimi is None and random_model else opts.mimi
    audio_tokenizer = load_mimi(mimi, dev)
    wm = load_watermark_stage(opts.watermark, dev, opts.watermark_key,
                              random_weights=random_model, small=opts.model == "random:tiny")
    gen = Generator(csm, tok, audio_tokenizer, dev, watermarker=wm, options=opts)
    gen.events.extend(events)
    return gen


DTYPE_NAMES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def pick_dtype(device: torch.device, quantize: str | None = None
               ) -> tuple[torch.dtype, str | None]:
    """dtype="auto" -> (dtype, quantize): bf16 on CUDA; on a CPU the fastest of fp32, bf16 and,
    when int8 was asked for, int8 weights (with each int8 kernel this CPU has: capped at AVX2,
    oneDNN's ran 8x slower than FBGEMM's), for CSM-1B's largest product (8192x2048 at batch 1),
    measured here: bf16 reads half the bytes but is slower than fp32 on CPUs without AVX-512
    BF16 or AMX, and int8 has no fast kernel on some CPUs (ARM). Says what it picked and why."""
    if device.type != "cpu":
        return default_dtype(device), quantize
    from csm_streaming.model.cpu_kernels import time_in_turns
    from csm_streaming.model.quantize import Int8Linear, int8_cpu_kernels

    w32, x = torch.randn(8192, 2048) * 0.02, torch.randn(1, 1, 2048)
    pairs = {name: (w32.to(dtype), x.to(dtype)) for name, dtype in DTYPE_NAMES.items()}
    candidates = {name: lambda w=w, xi=xi: torch.nn.functional.linear(xi, w)
                  for name, (w, xi) in pairs.items()}
    if quantize == "int8":
        for kernel in int8_cpu_kernels():
            layer = Int8Linear(w32)
            layer.use_cpu_kernel(kernel)
            candidates[f"int8 ({kernel})"] = lambda layer=layer: layer(x)
    times = {name: s * 1000 for name, s in time_in_turns(candidates).items()}
    best = min(times, key=times.get).split(" ")[0]  # int8 with whichever kernel was faster
    said = ", ".join(f"{k} {v:.2f} ms" for k, v in times.items())
    if quantize == "int8" and best != "int8":
        log.warning("dtype auto: %s on this CPU; int8 was asked for but is slower here (%s for "
                    "an 8192x2048 product): the weights stay %s", best, said, best)
        return DTYPE_NAMES[best], None
    log.info("dtype auto: %s on this CPU (%s for an 8192x2048 product)", best, said)
    return (torch.float32, "int8") if best == "int8" else (DTYPE_NAMES[best], quantize)


def pick_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' -> cuda, then mps, then cpu. An explicit device that cannot be used is an error."""
    if str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but CUDA is not available "
                           "(no GPU, or a CPU-only torch): use device='cpu' or 'auto'")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError("device 'mps' was asked for but is not available: use 'cpu' or 'auto'")
    return device


def load_streaming_csm_1b(device: str = "auto", config: StreamingConfig | None = None,
                          model: str = DEFAULT_REPO, **options) -> StreamingGenerator:
    """Load CSM-1B for streaming: `model` and options as `load_csm_1b` (LoadOptions' fields)."""
    sg = StreamingGenerator(load_generator(device, LoadOptions(model=model, **options)),
                            config or StreamingConfig())
    if sg.needs_warmup:  # compiled / graphed: pay for it here, not in the first audio
        sg.warmup()
    return sg
