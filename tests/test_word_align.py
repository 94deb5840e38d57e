"""Word timings heard in the audio (engine/word_align.py): the CTC path search is the best
alignment, the aligner puts each word where its letters are heard, and the voice-agent sockets
send those times (speech_contexts.aligned_word_times)."""

import itertools
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import ALIGN_VOCAB as VOCAB
from csm_streaming.audio import SAMPLE_RATE
from csm_streaming.engine.word_align import ALIGN_RATE, CtcAligner, ctc_path
from csm_streaming.server.speech_contexts import HeardAudio, aligned_word_times, word_times

STEP = 320  # wav2vec 2.0's samples (16 kHz) a step: 20 ms


def collapse(path, blank):
    out = [k for k, _ in itertools.groupby(path)]
    return [k for k in out if k != blank]


@pytest.mark.parametrize("targets", [[1, 2, 3], [1, 1, 2], [2, 2]])
def test_ctc_path_is_the_most_likely_alignment(targets):
    """Against every path of 7 steps over 4 tokens: the best one that CTC reads as the
    targets has the spans ctc_path gives."""
    rng = np.random.default_rng(len(targets) + targets[0])
    log_probs = np.log(rng.dirichlet(np.ones(4), size=7))
    best, best_path = -np.inf, None
    for path in itertools.product(range(4), repeat=7):
        if collapse(path, 0) == targets:
            score = log_probs[np.arange(7), path].sum()
            if score > best:
                best, best_path = score, path
    spans = ctc_path(log_probs, targets, blank=0)
    expected = []  # each target's first and last step in the best path
    t, k = 0, 0
    path = list(best_path)
    while t < len(path):
        if path[t] == 0:
            t += 1
            continue
        first = t
        while t + 1 < len(path) and path[t + 1] == path[first]:
            t += 1
        expected.append([first, t])
        k, t = k + 1, t + 1
    assert spans.tolist() == expected


def test_ctc_path_refuses_what_the_steps_cannot_hold():
    log_probs = np.log(np.full((3, 4), 0.25))
    assert ctc_path(log_probs, [1, 2, 3], 0) is not None  # one step each
    assert ctc_path(log_probs, [1, 1, 2], 0) is None  # the repeat needs a blank between
    assert ctc_path(log_probs, [1, 2, 3, 1], 0) is None
    assert ctc_path(log_probs, [], 0) is None


class ScriptedRecogniser(torch.nn.Module):
    """A stand-in wav2vec 2.0 CTC model that hears a script: one token per 20 ms step (blank
    where the script has none), whatever the audio."""

    def __init__(self, script: list[str]):
        super().__init__()
        self.script = script
        self.config = SimpleNamespace(inputs_to_logits_ratio=STEP)
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # its device

    def forward(self, x):
        steps = x.shape[1] // STEP
        logits = torch.full((1, steps, len(VOCAB)), -20.0)
        for t in range(steps):
            token = self.script[t] if t < len(self.script) else "<pad>"
            logits[0, t, VOCAB[token]] = 0.0
        return SimpleNamespace(logits=logits)


def scripted(*spans_and_words, steps):
    """A script: each word's letters spread over its (first, last) step, blank around."""
    script = ["<pad>"] * steps
    for (first, last), letters in spans_and_words:
        for i, t in enumerate(np.linspace(first, last, len(letters)).round().astype(int)):
            script[t] = letters[i]
    return script


def test_the_aligner_puts_each_word_where_its_letters_are_heard():
    """"Hi, you 2." heard as HI at steps 10-14, YOU at 30-37, TWO (the number spoken) at
    60-65: each word's start and end are those steps (20 ms each), pauses left between."""
    script = scripted(((10, 14), "HI"), ((30, 37), "YOU"), ((60, 65), "TWO"), steps=100)
    aligner = CtcAligner(ScriptedRecogniser(script), VOCAB, blank=0)
    audio = np.zeros(2 * SAMPLE_RATE, np.float32)  # 2 s: 100 steps at 16 kHz
    times = aligner.align(["Hi,", "you", "2."], audio)
    assert np.allclose(times, [(0.20, 0.30), (0.60, 0.76), (1.20, 1.32)], atol=1e-9)
    # a word with no letter shares the span of the next one that has
    times = aligner.align(["Hi", "—", "you", "2"], audio)
    assert times[0] == pytest.approx((0.20, 0.30))
    (a, b), (c, d) = times[1], times[2]
    assert a == pytest.approx(0.60) and b == pytest.approx(c) and d == pytest.approx(0.76)
    assert a < b < d
    assert aligner.align(["—"], audio) is None  # nothing to align: the caller estimates
    assert aligner.align(["Hi", "you"], audio[:STEP]) is None  # too short for the letters


def test_a_phrase_it_cannot_align_keeps_the_estimate():
    script = scripted(((2, 4), "HI"), steps=50)
    aligner = CtcAligner(ScriptedRecogniser(script), VOCAB, blank=0)
    audio = np.zeros(SAMPLE_RATE, np.float32)
    got = aligned_word_times(aligner, "Hi", audio, 3.0, 4.0)
    assert got.aligned and got.words == ["Hi"] and got.phrase == (3.0, 4.0)
    assert got.start == [3.04] and got.end == [3.1]  # steps 2..4, from the phrase's start
    estimate = aligned_word_times(aligner, "— …", audio, 3.0, 4.0)
    assert not estimate.aligned and estimate == word_times("— …", 3.0, 4.0)


def test_heard_audio_hands_out_each_phrase_and_forgets_what_came_before():
    heard = HeardAudio()
    for part in np.split(np.arange(10, dtype=np.float32), [3, 4, 8]):
        heard.add(part)
    assert heard.take(0, 4).tolist() == [0, 1, 2, 3]
    heard.add(np.array([10, 11], np.float32))
    assert heard.take(4, 9).tolist() == [4, 5, 6, 7, 8]
    assert heard.first == 9 and heard.take(9, 12).tolist() == [9, 10, 11]


def test_a_wav2vec2_folder_loads_and_aligns(tmp_path):
    """The real loading path (transformers' Wav2Vec2ForCTC and its CTC tokenizer) over a tiny
    random model saved to a folder; a folder that is not one is refused with what to do."""
    import json

    transformers = pytest.importorskip("transformers")
    config = transformers.Wav2Vec2Config(
        vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=37, conv_dim=(16,) * 7, num_feat_extract_layers=7, pad_token_id=0,
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2, do_stable_layer_norm=True)
    torch.manual_seed(0)
    transformers.Wav2Vec2ForCTC(config).save_pretrained(tmp_path)
    (tmp_path / "vocab.json").write_text(json.dumps(VOCAB))
    transformers.Wav2Vec2CTCTokenizer(str(tmp_path / "vocab.json")).save_pretrained(tmp_path)
    aligner = CtcAligner.load(str(tmp_path))
    assert aligner.step_s == STEP / ALIGN_RATE and aligner.blank == 0 and aligner.upper
    words = "Random weights still give every word once.".split()
    rng = np.random.default_rng(0)
    times = aligner.align(words, rng.standard_normal(3 * SAMPLE_RATE).astype(np.float32) * 0.1)
    assert len(times) == len(words)
    assert all(a < b for a, b in times) and all(b <= c for (_, b), (c, _) in zip(times, times[1:]))
    assert times[0][0] >= 0 and times[-1][1] <= 3.0 + aligner.step_s
    with pytest.raises(RuntimeError, match="leave --word-aligner out"):
        CtcAligner.load(str(tmp_path / "missing"))
