"""The upstream-compatible Generator: prompt layout, input checks, end of speech, context."""

import warnings

import pytest
import torch

from conftest import patch_sample_frame, speech_like
from csm_streaming.audio import FRAME_SAMPLES, to_mono_24k
from csm_streaming.engine.loader import load_csm_1b, pick_device
from csm_streaming.engine.prompt_rows import audio_rows
from csm_streaming.model.checkpoints import load_mimi
from csm_streaming.model.hub import CheckpointError
from csm_streaming.model.sampling import (
    MIMI_CODES,
    candidates_for,
    exponential_noise,
    is_eos,
    sample_topk,
)
from csm_streaming.request import GenerationRequest, Segment


def test_text_segment_layout(tiny_generator):
    tokens, mask = tiny_generator.tokenize_text("Hi there", 3)
    tok = tiny_generator.text_tokenizer
    ids = tok.encode("[3]Hi there").ids
    assert ids[0] == tok.token_to_id("<|begin_of_text|>") and ids[-1] == tok.token_to_id(
        "<|end_of_text|>"
    )
    assert tokens[:, 32].tolist() == ids and mask[:, 32].all() and not mask[:, :32].any()
    assert not tokens[:, :32].any()


def test_audio_segment_layout(tiny_generator):
    audio = speech_like(0.4)  # 5 frames of 80 ms
    tokens, mask = audio_rows(tiny_generator.encode_audio(audio))
    assert tokens.shape == (6, 33)  # 5 frames + the all-zero end frame
    assert mask[:, :32].all() and not mask[:, 32].any()
    assert not tokens[-1].any() and tokens[:-1, :32].any()


def test_context_of_any_rate_and_channels(tiny_generator):
    mono = speech_like(0.5)
    import soxr

    stereo_44k = torch.from_numpy(soxr.resample(mono.numpy(), 24000, 44100)).float()
    stereo_44k = torch.stack([stereo_44k, stereo_44k])  # [2, samples]
    back = to_mono_24k(stereo_44k, 44100)
    assert back.dim() == 1 and abs(back.shape[0] - mono.shape[0]) <= 2
    n = min(back.shape[0], mono.shape[0])
    assert torch.corrcoef(torch.stack([back[:n], mono[:n]]))[0, 1] > 0.99
    assert to_mono_24k(stereo_44k.T, 44100).shape == back.shape  # [samples, channels] too
    codes = tiny_generator.generate_codes("Reply.", 0, [Segment(1, "Hello.", stereo_44k, 44100)],
                                          max_audio_length_ms=400, seed=1)
    assert codes.shape == (5, 32)
    # not a whole number of 80 ms frames: generate (which decodes as it goes) must take it too
    odd = Segment(1, "Hello.", speech_like(0.53), 24000)
    assert (
        tiny_generator.generate("Reply.", 0, [odd], max_audio_length_ms=400, seed=1).numel()
        == 5 * 1920
    )


def test_is_eos_rule():
    end = torch.zeros(32, dtype=torch.long)
    assert is_eos(end)
    almost = end.clone()
    almost[26:] = 7  # codebook 0 and 25 more are zero: an end frame with a few codes sampled off
    assert is_eos(almost)
    too_few = end.clone()
    too_few[20:] = 7  # 20 zeros: below the threshold of 24
    assert not is_eos(too_few)
    speech = torch.arange(1, 33)
    assert not is_eos(speech)
    c0_speech = end.clone()
    c0_speech[0] = 5  # codebook 0 says speech goes on
    assert not is_eos(c0_speech)
    few = torch.arange(32) % 3  # codebook 0 zero but only 11 zero codes
    assert not is_eos(few)


def test_generation_stops_at_the_end_frame(own_generator):
    patch_sample_frame(own_generator.model, lambda codes, s: torch.where(
        (s.frame == 3)[:, None], torch.zeros_like(codes), codes))  # the end frame at frame 3
    codes = own_generator.generate_codes("Short.", 0, max_audio_length_ms=4000, seed=1)
    audio = own_generator.generate("Short.", 0, max_audio_length_ms=4000, seed=1)
    assert codes.shape == (3, 32) and audio.shape == (3 * FRAME_SAMPLES,)


def test_the_plain_loops_caches_are_made_at_its_first_use(own_generator):
    """A process that only streams never holds the reference loop's KV caches (0.13 GB at
    full size); the first generate makes them, on the model's device, with its window."""
    from csm_streaming.engine.config import StreamingConfig
    from csm_streaming.engine.frontend import StreamingGenerator

    sg = StreamingGenerator(own_generator, StreamingConfig())
    assert len(list(sg.generate_streaming("Streamed.", 0, max_audio_length_ms=240, seed=1)))
    assert own_generator._caches is None
    assert own_generator.max_seq_len == own_generator.model.window
    own_generator.generate("Plain.", 0, max_audio_length_ms=160, seed=1)
    caches = own_generator._caches
    assert caches is not None and caches.batch == 1
    assert caches.max_seq == own_generator.model.window
    assert caches.backbone[0].k.device == next(own_generator.model.parameters()).device
    assert own_generator.caches is caches  # made once


def test_max_length_and_seed(tiny_generator):
    a = tiny_generator.generate_codes("Same seed.", 0, max_audio_length_ms=800, seed=42)
    b = tiny_generator.generate_codes("Same seed.", 0, max_audio_length_ms=800, seed=42)
    c = tiny_generator.generate_codes("Same seed.", 0, max_audio_length_ms=800, seed=43)
    assert a.shape == (10, 32) and torch.equal(a, b) and not torch.equal(a, c)
    assert int(a.max()) < MIMI_CODES


def test_sampler_is_a_real_top_k_draw():
    torch.manual_seed(0)
    logits = torch.randn(1, 2051).repeat(4000, 1)
    b = logits.shape[0]
    temp = torch.full((b,), 1.0)
    topk = torch.full((b,), 3, dtype=torch.long)
    seed = torch.arange(b)
    draws = sample_topk(logits, temp, topk, seed, torch.zeros(b, dtype=torch.long))
    top3 = logits[0, :MIMI_CODES].topk(3)
    assert set(draws.tolist()) == set(top3.indices.tolist())
    freq = torch.bincount(draws, minlength=2051)[top3.indices].float() / b
    expected = torch.softmax(top3.values, 0)
    assert (freq - expected).abs().max() < 0.04
    # the noise of a stream depends on its seed and counter only, not on its batch row
    n1 = exponential_noise(torch.tensor([5, 9]), torch.tensor([3, 3]), 16)
    n2 = exponential_noise(torch.tensor([9]), torch.tensor([3]), 16)
    assert torch.equal(n1[1], n2[0]) and not torch.equal(n1[0], n1[1])


def test_sampler_draws_the_same_among_candidates_as_among_all_logits():
    """The step sorts only the largest `candidates` logits: for every row whose k fits, the
    draw is the full sort's, token for token (k, temperature and seed differ per row)."""
    g = torch.Generator().manual_seed(1)
    b = 600
    logits = torch.randn(b, 2051, generator=g) * 3
    temp = torch.rand(b, generator=g) + 0.3
    topk = torch.randint(1, 65, (b,), generator=g)
    seed, counter = torch.arange(b), torch.full((b,), 7)
    full = sample_topk(logits, temp, topk, seed, counter)
    assert torch.equal(sample_topk(logits, temp, topk, seed, counter, candidates=64), full)
    assert torch.equal(sample_topk(logits, temp, topk, seed, counter, candidates=256), full)
    assert len(set(full.tolist())) > 100  # a real draw, not the top-1 each time
    # a row whose k exceeds the candidates draws among the candidates only
    wide = torch.full((b,), 300)
    capped = sample_topk(logits, temp, wide, seed, counter, candidates=64)
    top64 = (logits / temp[:, None])[:, :MIMI_CODES].topk(64).indices
    assert (top64 == capped[:, None]).any(-1).all()
    assert candidates_for(50) == 64 and candidates_for(65) == 256 and candidates_for(257) is None


def test_context_too_long_drops_oldest_with_warning(tiny_generator):
    window = tiny_generator.max_seq_len  # 512 on the tiny model
    old = Segment(0, "old turn " * 20, speech_like(8.0, seed=1))  # ~100 frames + text
    new = Segment(1, "newer turn", speech_like(4.0, seed=2))
    req = GenerationRequest.of("Now me.", 0, [old, new, new],
                               max_audio_length_ms=16000)  # 200 frames
    with pytest.warns(UserWarning, match="dropped the 1 oldest of 3"):
        tokens, _ = tiny_generator.build_prompt(req)
    assert tokens.shape[0] + 200 <= window
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tiny_generator.build_prompt(GenerationRequest.of("Now me.", 0, [new],
                                                         max_audio_length_ms=1600))


def test_text_alone_too_long_is_a_clear_error(tiny_generator):
    with pytest.raises(
        ValueError, match="text is too long.*split the text or lower max_audio_length_ms"
    ):
        tiny_generator.generate_codes("word " * 400, 0, max_audio_length_ms=8000)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"text": ""}, "text"),
        ({"text": " \n"}, "text"),
        ({"text": None}, "text"),
        ({"speaker": -1}, "speaker"),
        ({"speaker": 1.5}, "speaker"),
        ({"speaker": True}, "speaker"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"temperature": 1e308}, "temperature"),
        ({"text": "bad \ud800 surrogate"}, "not valid Unicode"),
        ({"topk": 0}, "top_k"),
        ({"topk": 2.5}, "top_k"),
        ({"max_audio_length_ms": 0}, "max_audio_length_ms"),
        ({"max_audio_length_ms": -5}, "max_audio_length_ms"),
        ({"seed": -3}, "seed"),
        ({"context": [Segment(-2, "x", torch.ones(100))]}, r"context\[0\].speaker"),
        ({"context": [Segment(0, "x", torch.zeros(0))]}, r"context\[0\].audio is empty"),
        (
            {"context": [Segment(0, "x", codes=torch.zeros(3, 31, dtype=torch.long))]},
            r"context\[0\].codes",
        ),
        ({"context": [Segment(0, "x", codes=torch.full((3, 32), 2048))]}, r"context\[0\].codes"),
        (
            {"context": [Segment(0, "x", torch.tensor([0.1, float("nan")]))]},
            r"context\[0\].audio contains NaN",
        ),
        ({"context": ["not a segment"]}, r"context\[0\] must be a Segment"),
    ],
)
def test_bad_input_raises_value_error_naming_the_argument(own_generator, kwargs, name):
    args = {"text": "Fine.", "speaker": 0, **kwargs}
    calls = []
    own_generator.model.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match=name):
        own_generator.generate(**args)
    assert calls == []  # no model work was done


def test_random_models_by_name_and_unknown_ones():
    with pytest.raises(ValueError, match="random:tiny"):
        load_csm_1b("cpu", "random:huge", watermark=False)
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        pick_device("cuda") if not torch.cuda.is_available() else (_ for _ in ()).throw(
            RuntimeError("CUDA is not available (skipped: a GPU is present)"))
    assert pick_device("auto").type in ("cuda", "mps", "cpu")


def test_mimi_offline_error_says_what_to_do():
    with pytest.raises(CheckpointError, match="mimi='random'"):
        load_mimi("nobody/no-mimi-here", "cpu")
