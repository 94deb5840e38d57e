"""A quantized model's weights kept on disk, so that the next start of the same setting reads
them instead of reading the full-precision checkpoint (or drawing random weights) and
quantizing it again: CSM-1B's int8 weights are 2.3 GB against the checkpoint's 6, and reading
them skips the quantizing (see docs/performance.md for the seconds).

    <CSM_CACHE_DIR, else $XDG_CACHE_HOME/csm_streaming, else ~/.cache/csm_streaming>/
      quantized/<key>/manifest.json            what they are: source, mode, model shapes
      quantized/<key>/<parameter>.safetensors  one file per parameter built (an int8 layer's
                                               rows and scales, a table, a norm's scale)

The key is a hash of the weights' source (each weight file's resolved path, size and
modification time, the config; or the random model's name, seed and drawing code), the mode
and dtype, and the code and settings that decide the quantized values: a changed checkpoint,
setting or quantizer is a new key, never a stale read. A folder appears whole or not at all
(written beside it, renamed when complete). Nothing removes old folders: delete them to free
their space. `--no-weight-cache` (LoadOptions.weight_cache=False) reads and writes none.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch

from csm_streaming.model import embedding_tables, quantize
from csm_streaming.model.csm import ModelArgs
from csm_streaming.model.llama import LlamaArgs, RopeScaling

log = logging.getLogger("csm.weight_cache")

FORMAT = 1
CACHED_MODES = ("int8",)  # int4's packed layout is its CPU kernel's: it is built each start
MANIFEST = "manifest.json"


def cache_root() -> Path:
    """Where this package keeps what it made for the next start."""
    if os.environ.get("CSM_CACHE_DIR"):
        return Path(os.environ["CSM_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "csm_streaming"


def files_source(files: list[Path], config: dict | None) -> dict:
    """A checkpoint's identity: its weight files (a hub snapshot's resolve to blobs named by
    their hash) with their sizes and modification times, and its config."""
    found = []
    for f in map(Path.resolve, files):
        st = f.stat()
        found.append([str(f), st.st_size, st.st_mtime_ns])
    return {"files": found, "config": config}


def random_source(flavour: str, drawn_by: Path, seed: int = 0) -> dict:
    """Random weights' identity: the model, the seed and the file whose code draws them."""
    code = hashlib.sha256(drawn_by.read_bytes()).hexdigest()
    return {"random": flavour, "seed": seed, "drawn_by": code}


def _code_hash() -> str:
    """The quantizer's code and settings: a change to either makes a new key."""
    h = hashlib.sha256()
    for module in (quantize, embedding_tables):
        h.update(Path(module.__file__).read_bytes())
    h.update(repr((quantize.TWO_PART_INT8, embedding_tables.INT8_TABLES,
                   embedding_tables.EMBEDDING_GROUP)).encode())
    return h.hexdigest()


def args_to_json(args: ModelArgs) -> dict:
    return dataclasses.asdict(args)


def args_from_json(d: dict) -> ModelArgs:
    def part(p: dict) -> LlamaArgs:
        scaling = p.get("rope_scaling")
        return LlamaArgs(**{**p, "rope_scaling": RopeScaling(**scaling) if scaling else None})

    return ModelArgs(**{**d, "backbone": part(d["backbone"]), "decoder": part(d["decoder"])})


class WeightCache:
    """The cached quantized weights of one source and setting (present or not)."""

    def __init__(self, source: dict, mode: str, dtype: torch.dtype, root: Path | None = None):
        if mode not in CACHED_MODES:
            raise ValueError(f"only {', '.join(CACHED_MODES)} weights are cached (got {mode!r})")
        key = json.dumps({"format": FORMAT, "source": source, "mode": mode, "dtype": str(dtype),
                          "code": _code_hash()}, sort_keys=True)
        self.folder = (root or cache_root()) / "quantized" / hashlib.sha256(
            key.encode()).hexdigest()[:24]
        self.source, self.mode = source, mode

    def args(self) -> ModelArgs | None:
        """The cached model's shapes, or None where nothing (whole) is cached."""
        try:
            manifest = json.loads((self.folder / MANIFEST).read_text())
            return args_from_json(manifest["args"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:  # damaged: build it again
            log.warning("cached weights in %s are unreadable (%s): removing them", self.folder, e)
            self.remove()
            return None

    def read(self, name: str) -> dict[str, torch.Tensor]:
        """One parameter's built tensors, mapped from its file: a page comes into memory when
        it is first read (copied into the model, or looked up where the tensor itself is
        kept), and goes with the last tensor of the file."""
        return _mapped(self.folder, name)

    def remove(self):
        shutil.rmtree(self.folder, ignore_errors=True)

    def writer(self, args: ModelArgs) -> CacheWriter:
        return CacheWriter(self, args)


class CacheWriter:
    """Writes a cache folder beside its place, one parameter at a time (`save`, from any
    thread), and moves it in whole (`commit`). A failed write (a full disk) is logged once and
    the load goes on without a cache."""

    def __init__(self, cache: WeightCache, args: ModelArgs):
        self.cache, self.args, self.failed, self.bytes = cache, args, False, 0
        self.part = cache.folder.with_name(f"{cache.folder.name}.part-{os.getpid()}")
        try:
            self.part.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            self._fail(e)

    def save(self, name: str, tensors: dict[str, torch.Tensor]) -> bool:
        """Write one parameter's built tensors -> whether they were written."""
        if self.failed:
            return False
        from safetensors.torch import save_file

        try:
            save_file({k: t.detach().contiguous() for k, t in tensors.items()},
                      _file(self.part, name))
            self.bytes += sum(t.nbytes for t in tensors.values())
            return True
        except OSError as e:
            self._fail(e)
            return False

    def read(self, name: str) -> dict[str, torch.Tensor]:
        """What `save` wrote, mapped from its file (as WeightCache.read)."""
        return _mapped(self.part, name)

    def _fail(self, e: OSError):
        if not self.failed:
            log.warning("cannot keep the quantized weights for the next start (%s): this start "
                        "goes on without", e)
        self.failed = True

    def commit(self):
        """Move the folder in place, if every parameter was written."""
        if self.failed:
            return self.abandon()
        manifest = {"format": FORMAT, "mode": self.cache.mode, "source": self.cache.source,
                    "args": args_to_json(self.args)}
        try:
            (self.part / MANIFEST).write_text(json.dumps(manifest, indent=1))
            self.cache.remove()  # a damaged one, or another process's: ours is as good
            os.replace(self.part, self.cache.folder)
        except OSError as e:
            self._fail(e)
            return self.abandon()
        log.info("kept the %s weights in %s (%.2f GB) for the next start (--no-weight-cache: "
                 "none)", self.cache.mode, self.cache.folder, self.bytes / 1e9)

    def abandon(self):
        shutil.rmtree(self.part, ignore_errors=True)


def _file(folder: Path, name: str) -> Path:
    return folder / f"{name}.safetensors"


def _mapped(folder: Path, name: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(_file(folder, name))


def build_through(cache: WeightCache | None, read_state, build):
    """A quantized model built from the cache where it holds it, else from its source, then
    kept there. read_state() -> (args, state) reads the source (state None: random weights);
    build(args, state, cache=None) builds (checkpoints.build_model's way), reading from the
    cache or keeping in a writer of it."""
    if cache is None:
        return build(*read_state())
    from safetensors import SafetensorError

    args = cache.args()
    if args is not None:
        try:
            return build(args, None, cache=cache)
        except (OSError, RuntimeError, ValueError, KeyError, SafetensorError) as e:
            log.warning("cached weights in %s could not be read (%s): removing them and "
                        "loading from the source", cache.folder, e)
            cache.remove()
    args, state = read_state()
    writer = cache.writer(args)
    try:
        model = build(args, state, cache=writer)
    except BaseException:
        writer.abandon()
        raise
    writer.commit()
    return model
