"""csm_streaming.model against an independent implementation: transformers'
CsmForConditionalGeneration.

A tiny random transformers checkpoint (save_pretrained) is loaded through our loader; logits and
greedy codes must match what transformers' own modules compute on the same weights.
"""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from conftest import make_hf_checkpoint, speech_like
from csm_streaming.engine.reference import Generator
from csm_streaming.model.checkpoints import load_model_and_tokenizer, original_to_transformers
from csm_streaming.model.csm import CSM
from csm_streaming.model.hub import CheckpointError, pick_weight_files, resolve_checkpoint
from csm_streaming.request import GenerationRequest, Segment

CPU = torch.device("cpu")


def hf_embed(hf, tokens, mask):
    """Embed a prompt [S, 33] with transformers' modules: a text token or a sum of audio codes."""
    rows = []
    for t, m in zip(tokens, mask):
        if m[32]:
            rows.append(hf.embed_text_tokens(t[32:33])[0])
        else:
            rows.append(hf.backbone_model.embed_tokens(t[None, None, :32])[0, 0])
    return torch.stack(rows)[None]


def audio_argmax(logits):
    """argmax over the 2048 ids Mimi can decode (transformers' suppress_tokens=[2048, 2049, 2050],
    which random weights need: they do pick those ids)."""
    return logits[..., :2048].argmax(-1)


@torch.no_grad()
def hf_greedy_codes(hf, embeds, n_frames):
    """Greedy CSM decoding written with transformers' backbone, heads and depth decoder."""
    out = hf.backbone_model(inputs_embeds=embeds, use_cache=True)
    past, h = out.past_key_values, out.last_hidden_state[:, -1]
    frames = []
    for _ in range(n_frames):
        c = audio_argmax(hf.lm_head(h))
        codes = [c]
        ids = torch.stack([torch.zeros_like(c), c], dim=1)
        dout = hf.depth_decoder(input_ids=ids, backbone_last_hidden_state=h, use_cache=True,
                                logits_to_keep=1)
        for i in range(1, 32):
            c = audio_argmax(dout.logits[:, -1])
            codes.append(c)
            if i < 31:
                dout = hf.depth_decoder(input_ids=c[:, None], past_key_values=dout.past_key_values,
                                        use_cache=True, logits_to_keep=1)
        frame = torch.stack(codes, dim=1)  # [1, 32]
        frames.append(frame)
        out = hf.backbone_model(input_ids=frame[:, None], past_key_values=past, use_cache=True)
        past, h = out.past_key_values, out.last_hidden_state[:, -1]
    return torch.cat(frames)


def load_ours(folder, mimi):
    model, tok, desc = load_model_and_tokenizer(str(folder), CPU, torch.float32)
    return Generator(model, tok, mimi), desc


def greedy(gen, text, context=(), frames=20):
    return gen.generate_codes(text, 0, context, max_audio_length_ms=frames * 80, topk=1, seed=0,
                              stop_at_eos=False)


@torch.no_grad()
def test_logits_equal_transformers(hf_checkpoint, mimi):
    hf, folder = hf_checkpoint
    gen, desc = load_ours(folder, mimi)
    assert "transformers format" in desc
    model: CSM = gen.model
    tokens, mask = gen.build_prompt(
        GenerationRequest.of("Hello there, how are you?", 1), reserve_frames=0
    )
    # backbone: hidden state after the prompt -> codebook-0 logits
    ours_h = model.prefill(tokens[None], mask[None], gen.caches, slot=0)
    theirs_h = hf.backbone_model(inputs_embeds=hf_embed(hf, tokens, mask)).last_hidden_state[:, -1]
    torch.testing.assert_close(ours_h, theirs_h, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(
        model.codebook0_head(ours_h), hf.lm_head(theirs_h), atol=1e-4, rtol=1e-4
    )
    # depth decoder: logits of codebook 1..3 given h and fixed earlier codes
    codes = torch.tensor([[17, 400, 1999, 5]])
    x = torch.stack([ours_h, model.embed_audio(0, codes[:, 0])], dim=1)
    pos = torch.arange(2)[None]
    for i in range(1, 4):
        dec = model.decoder(model.projection(x), pos, gen.caches.decoder, 0)[:, -1]
        ours_logits = dec @ model.audio_head[i - 1]
        theirs = hf.depth_decoder(
            input_ids=torch.cat([torch.zeros(1, 1, dtype=torch.long), codes[:, :i]], dim=1),
            backbone_last_hidden_state=theirs_h,
            logits_to_keep=1,
        ).logits[:, -1]
        torch.testing.assert_close(ours_logits, theirs, atol=1e-4, rtol=1e-4)
        x = model.embed_audio(i, codes[:, i])[:, None]
        pos = pos[:, -1:] + 1


@pytest.mark.parametrize("with_context", [False, True])
def test_greedy_codes_equal_transformers(hf_checkpoint, mimi, with_context):
    hf, folder = hf_checkpoint
    gen, _ = load_ours(folder, mimi)
    context = (
        [Segment(speaker=1, text="An earlier turn.", audio=speech_like(0.5))]
        if with_context
        else []
    )
    ours = greedy(gen, "Say something nice.", context)
    req = GenerationRequest.of("Say something nice.", 0, context)
    tokens, mask = gen.build_prompt(req, reserve_frames=20)
    theirs = hf_greedy_codes(hf, hf_embed(hf, tokens, mask), 20)
    assert ours.shape == (20, 32)
    assert len(set(ours[:, 0].tolist())) > 1, "codes should vary frame to frame"
    assert torch.equal(ours, theirs)


def test_original_format_gives_same_codes(hf_checkpoint, mimi, tmp_path):
    _, folder = hf_checkpoint
    gen, _ = load_ours(folder, mimi)
    state = {k: v.contiguous() for k, v in gen.model.state_dict().items()}
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "tokenizer.json").write_text((folder / "tokenizer.json").read_text())
    orig, desc = load_ours(tmp_path, mimi)  # no config.json: shapes name the flavour
    assert "original format" in desc
    assert torch.equal(greedy(orig, "Say something nice."), greedy(gen, "Say something nice."))
    # ckpt.pt (torch.save of the same state dict) loads too, straight from the file path
    (tmp_path / "model.safetensors").unlink()
    torch.save(state, tmp_path / "ckpt.pt")
    pt, desc = load_ours(tmp_path / "ckpt.pt", mimi)
    assert torch.equal(
        greedy(pt, "Say something nice.", frames=5), greedy(gen, "Say something nice.", frames=5)
    )


def test_round_trip_to_transformers_names(hf_checkpoint, mimi):
    hf, folder = hf_checkpoint
    gen, _ = load_ours(folder, mimi)
    back = original_to_transformers(gen.model.state_dict(), gen.model.args)
    theirs = {k: v for k, v in hf.state_dict().items() if not k.startswith("codec_model")}
    assert set(back) == set(theirs)
    for k in theirs:
        assert torch.equal(back[k], theirs[k]), k


def test_rope_settings_come_from_config(tmp_path, mimi):
    """A config.json without llama3 scaling must give other numbers than one with it."""
    plain = {"rope_type": "default", "rope_theta": 500000.0}
    hf = make_hf_checkpoint(tmp_path, rope=plain, seed=1)
    gen, _ = load_ours(tmp_path, mimi)
    assert gen.model.args.backbone.rope_scaling is None
    req = GenerationRequest.of("A fairly long sentence to reach far positions.", 0)
    tokens, mask = gen.build_prompt(req, reserve_frames=0)
    with torch.no_grad():
        ours = gen.model.prefill(tokens[None], mask[None], gen.caches, 0)
        theirs = hf.backbone_model(inputs_embeds=hf_embed(hf, tokens, mask)).last_hidden_state[
            :, -1
        ]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_sharded_transformers_checkpoint(hf_checkpoint, mimi, tmp_path):
    """The release's layout: transformers-0000N-of-0000M.safetensors + an index."""
    hf, folder = hf_checkpoint
    from safetensors.torch import load_file

    state = load_file(str(folder / "model.safetensors"))
    keys = sorted(state)
    half = len(keys) // 2
    shards = {"transformers-00001-of-00002.safetensors": keys[:half],
              "transformers-00002-of-00002.safetensors": keys[half:]}
    weight_map = {}
    for name, ks in shards.items():
        save_file({k: state[k].contiguous() for k in ks}, str(tmp_path / name))
        weight_map.update({k: name for k in ks})
    (tmp_path / "transformers.safetensors.index.json").write_text(
        json.dumps({"weight_map": weight_map})
    )
    for f in ("config.json", "tokenizer.json"):
        (tmp_path / f).write_text((folder / f).read_text())
    sharded, desc = load_ours(tmp_path, mimi)
    ref, _ = load_ours(folder, mimi)
    assert "transformers format" in desc
    assert torch.equal(greedy(sharded, "Hi.", frames=5), greedy(ref, "Hi.", frames=5))


def test_missing_checkpoint_says_what_to_do(tmp_path):
    with pytest.raises(CheckpointError, match="HF_HUB_OFFLINE|random:csm-1b"):
        resolve_checkpoint("nobody-here/no-such-csm")  # HF_HUB_OFFLINE=1 in the tests
    with pytest.raises(CheckpointError, match="neither an existing file"):
        resolve_checkpoint("not/a/repo/id")
    with pytest.raises(FileNotFoundError, match="no CSM weights"):
        load_model_and_tokenizer(str(tmp_path), CPU)


def test_weights_of_another_model_are_refused(tmp_path):
    save_file({"some.other.weight": torch.zeros(2, 2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="holds no CSM weights"):
        load_model_and_tokenizer(str(tmp_path), CPU)


def test_an_interrupted_download_in_the_cache_is_not_used(tmp_path, monkeypatch):
    """A cached snapshot with the config but no weights must not pass for a checkpoint."""
    import huggingface_hub as hub

    snap = tmp_path / "snapshot"
    snap.mkdir()
    (snap / "config.json").write_text("{}")
    monkeypatch.setattr(hub, "snapshot_download", lambda *a, **k: str(snap))
    with pytest.raises(CheckpointError, match="not in the Hugging Face cache"):
        resolve_checkpoint("someone/partial-csm")  # offline: the download then fails, clearly


def test_one_list_of_weight_files():
    """Local folders, hub downloads and deploy_vast.py pick weights by the same rule."""
    assert pick_weight_files(["config.json", "ckpt.pt", "model.safetensors"]) == [
        "model.safetensors"
    ]
    names = ["config.json", "transformers.safetensors.index.json",
             "transformers-00002-of-00002.safetensors", "transformers-00001-of-00002.safetensors"]
    assert pick_weight_files(names) == ["transformers.safetensors.index.json",
                                        "transformers-00001-of-00002.safetensors",
                                        "transformers-00002-of-00002.safetensors"]
    with pytest.raises(CheckpointError, match="no CSM weights"):
        pick_weight_files(["README.md"])


def test_offline_failure_is_fast_and_says_what_to_do(monkeypatch):
    """No cache and no hub: one probe, one message in command-line syntax, no retries."""
    import time

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "https://hub.invalid")  # DNS fails at once
    t = time.monotonic()
    with pytest.raises(CheckpointError) as e:
        resolve_checkpoint("nobody-here/no-such-csm")
    assert time.monotonic() - t < 10
    msg = str(e.value)
    assert "hub.invalid:443 cannot be reached" in msg and "--model random:csm-1b" in msg


@pytest.mark.parametrize("legacy", [False, True])
def test_a_ckpt_pt_is_mapped_where_it_can_be_and_read_where_not(tmp_path, legacy):
    """ckpt.pt's tensors are mapped from the file (torch.load mmap=True: a 6 GB checkpoint is
    not copied into memory before the model is filled); torch's legacy format, which cannot
    be mapped, is read instead: the same weights either way."""
    from csm_streaming.model.checkpoints import build_model, load_state
    from csm_streaming.model.csm import FLAVORS

    state = build_model(FLAVORS["tiny"], None, CPU, torch.float32).state_dict()
    torch.save(state, tmp_path / "ckpt.pt", _use_new_zipfile_serialization=not legacy)
    args, loaded, fmt = load_state([tmp_path / "ckpt.pt"], None)
    assert fmt == "original" and args == FLAVORS["tiny"] and loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    if os.path.exists("/proc/self/maps"):  # Linux: what the process maps is listed there
        assert (str(tmp_path / "ckpt.pt") in open("/proc/self/maps").read()) == (not legacy)
