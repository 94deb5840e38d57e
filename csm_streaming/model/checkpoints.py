"""Reading weights: both checkpoint formats, the text tokenizer, and the Mimi codec. csm.py holds
the model; this file fills it; hub.py finds the files.

`model=` values: a hub repo id, a local folder or weight file, or `random:<flavour>` (the same
classes with random weights and a small local tokenizer: no download). The format of a
checkpoint is detected from its tensor names. When the hub cannot be reached, one quick probe
says so and loading fails at once with one message, instead of retrying for half a minute.
"""

from __future__ import annotations

import json
import logging
import re
import zlib
from pathlib import Path

import torch

from csm_streaming.model import weight_cache as weight_cache_module
from csm_streaming.model.csm import CSM, FLAVORS, ModelArgs
from csm_streaming.model.hub import (
    MIMI_NAME,
    MIMI_REPO,
    RANDOM_PREFIX,
    CheckpointError,
    checkpoint_files,
    hub_unreachable_reason,
    is_random_model,
    resolve_checkpoint,
)
from csm_streaming.model.llama import LlamaArgs, RopeScaling, rope_tables, stack_checkpoint_parts

log = logging.getLogger("csm.checkpoints")

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"

# ---------------------------------------------------------------------------------------------
# Tensor names: the original format and the transformers format
# ---------------------------------------------------------------------------------------------

ORIGINAL_MARKER = "backbone.layers.0.attn.q_proj.weight"
TRANSFORMERS_MARKER = "backbone_model.layers.0.self_attn.q_proj.weight"

_HF_TO_ORIGINAL = [  # applied in order, like transformers' own convert_csm.py but reversed
    (r"^backbone_model\.layers\.", "backbone.layers."),
    (r"^depth_decoder\.model\.layers\.", "decoder.layers."),
    (r"\.self_attn\.", ".attn."),
    (r"\.o_proj\.", ".output_proj."),
    (r"\.mlp\.gate_proj\.", ".mlp.w1."),
    (r"\.mlp\.down_proj\.", ".mlp.w2."),
    (r"\.mlp\.up_proj\.", ".mlp.w3."),
    (r"\.input_layernorm\.weight$", ".sa_norm.scale"),
    (r"\.post_attention_layernorm\.weight$", ".mlp_norm.scale"),
    (r"^backbone_model\.norm\.weight$", "backbone.norm.scale"),
    (r"^depth_decoder\.model\.norm\.weight$", "decoder.norm.scale"),
    (r"^embed_text_tokens\.", "text_embeddings."),
    (r"^backbone_model\.embed_tokens\.embed_audio_tokens\.", "audio_embeddings."),
    (r"^lm_head\.", "codebook0_head."),
    (r"^depth_decoder\.model\.inputs_embeds_projector\.", "projection."),
    (r"^depth_decoder\.codebooks_head\.weight$", "audio_head"),
]
# Tensors of the transformers checkpoint we do not use: the depth decoder's tied copy of the
# audio embeddings, and the codec (Mimi comes from moshi's loader, which streams).
_HF_SKIP = re.compile(r"^(depth_decoder\.model\.embed_tokens\.|codec_model\.)")


def unpermute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rotate-half Q/K rows (transformers) -> interleaved rows (original). w: [H * D, dim]."""
    out, dim = w.shape
    return w.view(n_heads, 2, out // n_heads // 2, dim).transpose(1, 2).reshape(out, dim)


def permute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Interleaved rows (original) -> rotate-half rows (transformers); inverse of the above."""
    out, dim = w.shape
    return w.view(n_heads, out // n_heads // 2, 2, dim).transpose(1, 2).reshape(out, dim)


def transformers_to_original(state: dict[str, torch.Tensor], args: ModelArgs) -> dict:
    """Rename a transformers CSM state dict to ours and undo its Q/K permutation."""
    state = dict(state)
    # The audio embeddings are tied; save_pretrained may keep only the depth decoder's copy.
    tied = "depth_decoder.model.embed_tokens.weight"
    state.setdefault("backbone_model.embed_tokens.embed_audio_tokens.weight", state.get(tied))
    out = {}
    for key, w in state.items():
        if w is None or _HF_SKIP.match(key):
            continue
        new = key
        for pattern, repl in _HF_TO_ORIGINAL:
            new = re.sub(pattern, repl, new)
        m = re.match(r"^(backbone|decoder)\.layers\.\d+\.attn\.(q|k)_proj\.weight$", new)
        if m:
            part = args.backbone if m.group(1) == "backbone" else args.decoder
            w = unpermute_rope_rows(w, part.num_heads if m.group(2) == "q" else part.num_kv_heads)
        out[new] = w
    return out


def original_to_transformers(state: dict[str, torch.Tensor], args: ModelArgs) -> dict:
    """The reverse mapping (used by tests to write transformers-format files from ours)."""
    inverse = {}
    for hf_key in _hf_keys(args):
        ours = hf_key
        for pattern, repl in _HF_TO_ORIGINAL:
            ours = re.sub(pattern, repl, ours)
        inverse[ours] = hf_key
    out = {}
    for key, w in state.items():
        m = re.match(r"^(backbone|decoder)\.layers\.\d+\.attn\.(q|k)_proj\.weight$", key)
        if m:
            part = args.backbone if m.group(1) == "backbone" else args.decoder
            w = permute_rope_rows(w, part.num_heads if m.group(2) == "q" else part.num_kv_heads)
        out[inverse[key]] = w
    out["depth_decoder.model.embed_tokens.weight"] = state["audio_embeddings.weight"]
    return out


def _hf_keys(args: ModelArgs) -> list[str]:
    keys = ["embed_text_tokens.weight", "backbone_model.embed_tokens.embed_audio_tokens.weight",
            "lm_head.weight", "depth_decoder.model.inputs_embeds_projector.weight",
            "depth_decoder.codebooks_head.weight", "backbone_model.norm.weight",
            "depth_decoder.model.norm.weight"]
    for prefix, part in (("backbone_model", args.backbone), ("depth_decoder.model", args.decoder)):
        for i in range(part.num_layers):
            base = f"{prefix}.layers.{i}."
            keys += [base + f"self_attn.{p}_proj.weight" for p in "qkvo"]
            keys += [base + f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")]
            keys += [base + "input_layernorm.weight", base + "post_attention_layernorm.weight"]
    return keys


def args_from_hf_config(cfg: dict) -> ModelArgs:
    """ModelArgs from a transformers CsmConfig dict (config.json)."""
    dec = cfg.get("depth_decoder_config") or {}

    def part(c: dict, max_seq: int) -> LlamaArgs:
        rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
        theta = rope.get("rope_theta", c.get("rope_theta", 500_000.0))
        scaling = None
        if rope.get("rope_type", rope.get("type")) == "llama3":
            scaling = RopeScaling(
                factor=float(rope["factor"]),
                low_freq_factor=float(rope["low_freq_factor"]),
                high_freq_factor=float(rope["high_freq_factor"]),
                original_max_position_embeddings=int(rope["original_max_position_embeddings"]))
        heads = c["num_attention_heads"]
        if c.get("head_dim") not in (None, c["hidden_size"] // heads):
            raise ValueError(f"head_dim {c['head_dim']} != hidden_size / heads is not supported")
        return LlamaArgs(num_layers=c["num_hidden_layers"], num_heads=heads,
                         num_kv_heads=c.get("num_key_value_heads", heads), dim=c["hidden_size"],
                         intermediate_dim=c["intermediate_size"], max_seq_len=max_seq,
                         norm_eps=c.get("rms_norm_eps", 1e-5), rope_base=float(theta),
                         rope_scaling=scaling)

    n = cfg.get("num_codebooks", 32)
    return ModelArgs(backbone=part(cfg, cfg.get("max_position_embeddings", 2048)),
                     decoder=part(dec, n), text_vocab_size=cfg.get("text_vocab_size", 128_256),
                     audio_vocab_size=cfg.get("vocab_size", 2051), audio_num_codebooks=n)


def _flavor_from_shapes(state: dict[str, torch.Tensor]) -> ModelArgs:
    for args in FLAVORS.values():
        want = {
            "text_embeddings.weight": (args.text_vocab_size, args.backbone.dim),
            "projection.weight": (args.decoder.dim, args.backbone.dim),
            "backbone.layers.0.mlp.w1.weight": (args.backbone.intermediate_dim, args.backbone.dim),
            "decoder.layers.0.mlp.w1.weight": (args.decoder.intermediate_dim, args.decoder.dim),
        }
        n_bb = len({k.split(".")[2] for k in state if k.startswith("backbone.layers.")})
        n_dec = len({k.split(".")[2] for k in state if k.startswith("decoder.layers.")})
        if (all(tuple(state[k].shape) == v for k, v in want.items())
                and (n_bb, n_dec) == (args.backbone.num_layers, args.decoder.num_layers)):
            return args
    raise ValueError(
        "original-format checkpoint with shapes of no known flavour and no config.json "
        "beside it: put the checkpoint's config.json in the same folder"
    )


def _read_tensors(files: list[Path]) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in files:
        if f.suffix == ".safetensors":
            state.update(load_file(str(f)))
        else:  # ckpt.pt: a plain state dict (torch.save), loaded without executing code,
            obj = _torch_load_mapped(f)  # mapped as safetensors' are
            state.update(obj.get("model", obj) if isinstance(obj, dict) else obj)
    return state


def _torch_load_mapped(f: Path):
    """torch.load of a weight file, its tensors mapped from the file (their pages are read as
    the model is filled, and can be dropped again by the system: a 6 GB fp32 checkpoint is not
    copied into memory first); a file in torch's legacy format, which cannot be mapped, read."""
    try:
        return torch.load(f, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise
        return torch.load(f, map_location="cpu", weights_only=True)


def load_state(files: list[Path], config: dict | None) -> tuple[ModelArgs, dict, str]:
    """Read weight files, detect their format, return (args, state dict in our names, format)."""
    state = _read_tensors(files)
    if ORIGINAL_MARKER in state:
        args = args_from_hf_config(config) if config else _flavor_from_shapes(state)
        return args, state, "original"
    if TRANSFORMERS_MARKER in state:
        if config is None:
            raise ValueError("transformers-format CSM weights need their config.json beside them")
        args = args_from_hf_config(config)
        return args, transformers_to_original(state, args), "transformers"
    raise ValueError(f"{files[0]} holds no CSM weights: neither '{ORIGINAL_MARKER}' "
                     f"(original format) nor '{TRANSFORMERS_MARKER}' (transformers format) found")


def build_model(args: ModelArgs, state: dict | None, device, dtype,
                quantize: str | None = None, cache=None) -> CSM:
    """Build CSM on `device` in `dtype`; random init (std 0.02) when `state` is None. quantize
    ('int8', 'int4'): each layer quantized as its weights are written (the full-precision model
    never exists at once: quantized_load.build_quantized, which reads the quantized weights
    from a weight cache or keeps them in one, `cache`); `state` is emptied on the way."""
    with torch.device("meta"):
        model = CSM(args)
    if quantize:
        model = model.to(dtype=dtype)  # on meta: allocated below in the right dtype at once
    model = model.to_empty(device=device)
    # Buffers are not in checkpoints: recompute them on the real device, in fp32, then cast with
    # the weights (see Transformer: the RoPE tables follow the model's dtype, as upstream's do).
    for part in (model.backbone, model.decoder):
        part.rope_cos, part.rope_sin = rope_tables(part.args, device)
    model.codebook_offsets = (torch.arange(args.audio_num_codebooks, device=device)
                              * args.audio_vocab_size)
    model = model.to(dtype=dtype)
    if quantize:
        from csm_streaming.model.quantized_load import build_quantized

        if state is not None:
            stack_checkpoint_parts(model, state)  # as load_state_dict's hooks do
        reading = isinstance(cache, weight_cache_module.WeightCache)
        fill = None if reading else random_fill(device) if state is None else state_fill(state)
        build_quantized(model, fill, quantize, cache)
        if state:
            raise ValueError(f"checkpoint does not match the model: unexpected {sorted(state)[:5]}")
    elif state is None:
        init_random(model)
    else:
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"checkpoint does not match the model: missing {sorted(missing)[:5]}, "
                             f"unexpected {sorted(unexpected)[:5]}")
    return model.eval().requires_grad_(False)


def random_fill(device, seed: int = 0):
    """fill(name, tensor): Normal(0, 0.02) weights, unit norms, in place. Each parameter draws
    from a generator of its own, seeded by `seed` and its name, so the values do not depend on
    the order the parameters are filled in (build_quantized writes the embeddings first)."""
    def fill(name: str, p: torch.Tensor):
        if name.endswith(".scale"):
            p.fill_(1.0)
        else:
            g = torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(
                name.encode()))
            p.normal_(0.0, 0.02, generator=g)
    return fill


def state_fill(state: dict):
    """fill(name, tensor): the checkpoint's tensor copied in and dropped from `state`, so its
    memory goes as the model fills (what is left at the end was not the model's)."""
    def fill(name: str, p: torch.Tensor):
        if name not in state:
            raise ValueError(f"checkpoint does not match the model: missing {name}")
        p.copy_(state.pop(name))
    return fill


@torch.no_grad()
def init_random(model: CSM, seed: int = 0):
    """Normal(0, 0.02) weights, unit norms; in place, in the model's dtype, on its device."""
    fill = random_fill(next(model.parameters()).device, seed)
    for name, p in model.named_parameters():
        fill(name, p)


# ---------------------------------------------------------------------------------------------
# Text tokenizer, Mimi
# ---------------------------------------------------------------------------------------------


def load_text_tokenizer(path: Path):
    """The checkpoint's own tokenizer.json, with BOS/EOS around every encoded segment."""
    from tokenizers import Tokenizer
    from tokenizers.processors import TemplateProcessing

    tok = Tokenizer.from_file(str(path))
    bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
    if bos is None or eos is None:
        raise CheckpointError(f"{path} has no {BOS} / {EOS} tokens: not a Llama-3 tokenizer")
    tok.post_processor = TemplateProcessing(single=f"{BOS}:0 $A:0 {EOS}:0",
                                            special_tokens=[(BOS, bos), (EOS, eos)])
    return tok


_TINY_CORPUS = """The quick brown fox jumps over the lazy dog. Hello from Sesame, this is a test of
streaming speech. How are you doing today? I am fine, thank you very much! Numbers like one, two,
three and 42 or 3.14 appear too. Let us talk about the weather, the news and the time of day.
[0] [1] [2] [3] Speaker zero said something; speaker one answered, quietly and slowly."""


def random_text_tokenizer(vocab_size: int = 512):
    """A small byte-level BPE trained in memory (no download): for random models only."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from tokenizers.processors import TemplateProcessing

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([_TINY_CORPUS] * 4, trainer=trainer)
    tok.post_processor = TemplateProcessing(single=f"{BOS}:0 $A:0 {EOS}:0",
                                            special_tokens=[(BOS, tok.token_to_id(BOS)),
                                                            (EOS, tok.token_to_id(EOS))])
    return tok


def load_mimi(spec: str | None, device):
    """Mimi through moshi's loader. spec: None (Kyutai's repo), 'random', a file or a repo id."""
    from moshi.models import loaders

    if spec == "random":
        with torch.random.fork_rng(devices=[]):  # the same random codec in every process
            torch.manual_seed(0)
            mimi = loaders.get_mimi(None, device=device)
        _randomize_codebooks(mimi)
    else:
        mimi = loaders.get_mimi(str(_mimi_file(spec)), device=device)
    mimi.set_num_codebooks(32)
    return mimi.eval()


def _mimi_file(spec: str | None) -> Path:
    path = Path(spec).expanduser() if spec else None
    if path is not None and path.exists():
        return path
    repo = spec or MIMI_REPO
    import huggingface_hub as hub

    try:  # the cache first: offline, no request
        return Path(hub.hf_hub_download(repo, MIMI_NAME, local_files_only=True))
    except Exception:
        pass
    hint = ("pass mimi=<local .safetensors file> (--mimi FILE), or mimi='random' (--mimi random) "
            "for a codec with random weights")
    reason = hub_unreachable_reason()
    if reason is not None:
        raise CheckpointError(f"the Mimi codec ({repo}/{MIMI_NAME}) is not cached and cannot be "
                              f"downloaded: {reason}. Connect to the internet, or {hint}.")
    try:
        return Path(hub.hf_hub_download(repo, MIMI_NAME))
    except Exception as e:
        raise CheckpointError(
            f"could not get the Mimi codec ({repo}/{MIMI_NAME}): "
            f"{type(e).__name__}: {e}. Connect to the internet, or {hint}."
        ) from e


@torch.no_grad()
def _randomize_codebooks(mimi, seed: int = 0):
    """moshi's random Mimi has all-zero codebooks, so every input encodes to code 0. Give them
    random centroids, so encoded context audio yields varied codes, as a trained codec does."""
    g = torch.Generator().manual_seed(seed)
    for name, buf in mimi.named_buffers():
        if name.endswith("_codebook.embedding_sum"):
            buf.copy_(torch.randn(buf.shape, generator=g).to(buf) * 0.1)
        elif name.endswith("_codebook._initialized"):
            buf.fill_(1.0)


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_model_and_tokenizer(model: str, device: torch.device, dtype: torch.dtype | None = None,
                             quantize: str | None = None, weight_cache: bool = True):
    """-> (CSM on device, tokenizer, description). `random:<flavour>` builds random weights.
    quantize: int8 / int4 weights, quantized as they load (build_model); int8 weights are
    read from and kept in the weight cache (model/weight_cache.py) unless weight_cache=False."""
    dtype = dtype or default_dtype(device)
    if is_random_model(model):
        flavour = model[len(RANDOM_PREFIX):]
        if flavour not in FLAVORS:
            raise ValueError(f"unknown random model '{model}': use one of "
                             + ", ".join(RANDOM_PREFIX + f for f in FLAVORS))
        args = FLAVORS[flavour]
        tok = random_text_tokenizer(min(512, args.text_vocab_size))
        source = weight_cache_module.random_source(flavour, Path(__file__))  # random_fill's
        described = "random weights"

        def read_state():
            return args, None
    else:
        path = resolve_checkpoint(model)
        folder = path if path.is_dir() else path.parent
        files = checkpoint_files(folder) if path.is_dir() else [path]
        config = None
        if (folder / "config.json").is_file():
            config = json.loads((folder / "config.json").read_text())
            if config.get("model_type") not in (None, "csm"):
                config = None  # not a CsmConfig (an original-format folder may hold its own)
        source, described = weight_cache_module.files_source(files, config), "read"
        formats = []

        def read_state():
            args, state, fmt = load_state(files, config)
            formats.append(fmt)
            tokenizer_file(folder)  # before the weights are built
            return args, state
    cache = None
    if weight_cache and quantize in weight_cache_module.CACHED_MODES:
        cache = weight_cache_module.WeightCache(source, quantize, dtype)
    built = weight_cache_module.build_through(
        cache, read_state, lambda args, state, **kw: build_model(args, state, device, dtype,
                                                                  quantize, **kw))
    if not is_random_model(model):
        tok = load_text_tokenizer(tokenizer_file(folder))
        described = f"{formats[0]} format" if formats else f"{quantize} weights from the cache"
    return built, tok, f"{model} ({described})"


def tokenizer_file(folder: Path) -> Path:
    if not (folder / "tokenizer.json").is_file():
        raise CheckpointError(f"{folder} has no tokenizer.json: copy the checkpoint's "
                              "tokenizer.json beside the weights")
    return folder / "tokenizer.json"
