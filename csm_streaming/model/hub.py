"""Where weights come from: repo names, the Hugging Face hub (download, cache, a quick probe
when it cannot be reached), local folders, and which files of a checkpoint hold its weights.
No torch: the command line and deploy_vast.py use it before anything heavy loads.
"""

from __future__ import annotations

import json
import logging
import socket
from pathlib import Path
from urllib.parse import urlparse

log = logging.getLogger("csm.checkpoints")

DEFAULT_REPO = "unsloth/csm-1b"  # an ungated copy of the release (transformers format)
OFFICIAL_REPO = "sesame/csm-1b"  # gated: accept the licence on its hub page first
MIMI_REPO = "kyutai/moshiko-pytorch-bf16"
MIMI_NAME = "tokenizer-e351c8d8-checkpoint125.safetensors"
RANDOM_PREFIX = "random:"

# Which files of a checkpoint hold its weights: the one list (local folders, hub downloads,
# deploy_vast.py --download). A single file of the original format wins over shards.
WEIGHT_FILES = ("model.safetensors", "ckpt.safetensors", "ckpt.pt")
WEIGHT_INDEXES = ("transformers.safetensors.index.json", "model.safetensors.index.json")
META_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


class CheckpointError(RuntimeError):
    """Weights could not be found or read; the message says what to do."""


def is_random_model(model: str) -> bool:
    return model.startswith(RANDOM_PREFIX)


OFFLINE_HINT = ("Connect to the internet (or unset HF_HUB_OFFLINE), or download on a machine "
                "that can (`python deploy_vast.py --download`) and copy the Hugging Face cache, "
                "or pass a local folder (--model PATH), or run the same code with random weights "
                "(--model random:csm-1b; model='random:csm-1b' in Python).")


# ---------------------------------------------------------------------------------------------
# Weight files
# ---------------------------------------------------------------------------------------------


def pick_weight_files(names: list[str]) -> list[str]:
    """The weight files among a checkpoint's file names (an index first, then its shards)."""
    for name in WEIGHT_FILES:
        if name in names:
            return [name]
    for index in WEIGHT_INDEXES:
        if index in names:
            prefix = index.split(".")[0]
            return [index] + sorted(n for n in names if n.startswith(prefix)
                                    and n.endswith(".safetensors") and n not in WEIGHT_FILES)
    raise CheckpointError(f"no CSM weights among {sorted(names)[:10]}: expected one of "
                          f"{', '.join(WEIGHT_FILES + WEIGHT_INDEXES)}")


def checkpoint_files(folder: Path) -> list[Path]:
    """The weight files of a local checkpoint folder (shards as named by their index)."""
    names = [p.name for p in folder.iterdir()] if folder.is_dir() else []
    try:
        picked = pick_weight_files(names)
    except CheckpointError:
        raise FileNotFoundError(
            f"no CSM weights in {folder}: expected model.safetensors, ckpt.pt or "
            "transformers.safetensors.index.json with its shards") from None
    if picked[0] in WEIGHT_INDEXES:
        shards = json.loads((folder / picked[0]).read_text())["weight_map"].values()
        return [folder / s for s in sorted(set(shards))]
    return [folder / picked[0]]


# ---------------------------------------------------------------------------------------------
# The hub
# ---------------------------------------------------------------------------------------------


def hub_unreachable_reason(timeout: float = 3.0) -> str | None:
    """One quick probe: why the Hugging Face hub cannot be reached, or None when it can."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as e:
        return f"{host}:{port} cannot be reached ({type(e).__name__}: {e})"


def _cached_snapshot(repo: str) -> Path | None:
    """A complete cached copy of `repo` (weights and tokenizer), or None: no request is made."""
    import huggingface_hub as hub
    from huggingface_hub import errors

    try:
        cached = Path(hub.snapshot_download(
            repo, local_files_only=True,
            allow_patterns=list(META_FILES) + ["*.safetensors*", "ckpt.pt"]))
        files = checkpoint_files(cached)
    except (errors.LocalEntryNotFoundError, FileNotFoundError, KeyError, ValueError):
        return None  # not cached, or cached without weights (an interrupted download)
    if all(f.is_file() for f in files) and (cached / "tokenizer.json").is_file():
        return cached
    log.info("the cached copy of %s is incomplete: downloading the rest", repo)
    return None


def download_checkpoint(repo: str, progress=None) -> Path:
    """Download a CSM checkpoint's weights, config and tokenizer into the Hugging Face cache
    (resuming partial files); return its folder. progress: called with a line per file."""
    import huggingface_hub as hub
    from huggingface_hub import errors

    token_hint = ("set HF_TOKEN (or run `hf auth login`) with an account that accepted the "
                  f"licence at https://huggingface.co/{repo}")
    try:
        names = hub.list_repo_files(repo)
        wanted = pick_weight_files(names) + [n for n in META_FILES if n in names]
        folder = None
        for i, name in enumerate(wanted, 1):
            if progress:
                progress(f"[{i}/{len(wanted)}] {repo}/{name}")
            folder = Path(hub.hf_hub_download(repo, name)).parent
        return folder
    except errors.GatedRepoError as e:
        raise CheckpointError(f"{repo} is gated: {token_hint}. Or use the ungated default "
                              f"'{DEFAULT_REPO}', or a local folder.") from e
    except errors.RepositoryNotFoundError as e:
        raise CheckpointError(f"{repo} was not found on the hub (or is private): check the "
                              f"name, or {token_hint}") from e
    except CheckpointError:
        raise
    except Exception as e:  # the network went away mid-way, a proxy, a full disk...
        raise CheckpointError(f"could not download {repo}: {type(e).__name__}: {e}. "
                              + OFFLINE_HINT) from e


def resolve_checkpoint(model: str) -> Path:
    """A local folder, a local weight file, or a hub repo id -> a local folder (or file)."""
    path = Path(model).expanduser()
    if path.exists():
        return path
    if model.count("/") != 1 or model.startswith((".", "/")):
        raise CheckpointError(f"'{model}' is neither an existing file or folder nor a hub repo "
                              "id like 'owner/name'")
    cached = _cached_snapshot(model)  # works offline and costs no request
    if cached is not None:
        return cached
    reason = hub_unreachable_reason()
    if reason is not None:
        from huggingface_hub import constants

        raise CheckpointError(f"{model} is not in the Hugging Face cache "
                              f"({constants.HF_HUB_CACHE}) and cannot be downloaded: {reason}. "
                              + OFFLINE_HINT)
    return download_checkpoint(model, progress=log.info)
