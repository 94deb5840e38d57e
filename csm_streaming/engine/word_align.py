"""Word timings heard in the audio: a CTC forced aligner (wav2vec 2.0) over a phrase's words.

The context sockets' default word timings share each phrase's span (exact: the engine records
the frame each phrase ends at) over its words in proportion to their length: an estimate
(server/speech_contexts.word_times). With `csm-server --word-aligner MODEL` each phrase's audio
is aligned to its words instead: a wav2vec 2.0 CTC model reads the audio (16 kHz, one step per
20 ms) and the most likely path through the phrase's letters (`ctc_path`: Viterbi over CTC's
states, a blank allowed between letters) gives each word's first and last step. Where the
recogniser hears the words, the edges are exact to a step; they do not depend on CSM's weights
(on random weights, whose audio is noise, the path is still a valid one: every word once, in
order, but where it lands means nothing).

facebook/wav2vec2-base-960h is the default model (Apache-2.0: commercial use allowed; English
letters and the apostrophe). MMS_FA's weights are CC-BY-NC, and torchaudio 2.9 removed
`forced_align`: the path search is ours. Needs transformers (the `align` extra).
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from csm_streaming.audio import SAMPLE_RATE
from csm_streaming.engine.normalize import normalize_text

DEFAULT_ALIGNER = "facebook/wav2vec2-base-960h"
ALIGN_RATE = 16_000  # what wav2vec 2.0 reads
WORD_DELIMITER = "|"  # wav2vec 2.0's CTC vocabularies' space


def ctc_path(log_probs: np.ndarray, targets: list[int], blank: int) -> np.ndarray | None:
    """The most likely CTC alignment of `targets` (token ids, no blank) to `log_probs` [T, V]:
    each target's first and last step, [L, 2] int. None when T steps cannot hold the targets
    (one step each, and a blank between two equal ones)."""
    steps, n = log_probs.shape[0], len(targets)
    repeats = sum(a == b for a, b in zip(targets, targets[1:]))
    if n == 0 or steps < n + repeats:
        return None
    states = np.full(2 * n + 1, blank)
    states[1::2] = targets  # blank, y1, blank, y2, ..., yn, blank
    emit = log_probs[:, states].astype(np.float64)  # [T, S]
    # a target's state may be entered from the target before it, skipping the blank between,
    # unless both are the same token (CTC would read them as one)
    skip = np.zeros(len(states), bool)
    skip[3::2] = states[3::2] != states[1:-2:2]
    none = np.full(len(states), -np.inf)
    score = none.copy()
    score[:2] = emit[0, :2]
    came = np.zeros((steps, len(states)), np.int8)  # 0: stayed, 1: from s-1, 2: from s-2
    for t in range(1, steps):
        step = np.concatenate([[-np.inf], score[:-1]])
        jump = np.where(skip, np.concatenate([[-np.inf, -np.inf], score[:-2]]), none)
        options = np.stack([score, step, jump])  # [3, S]
        came[t] = options.argmax(0)
        score = options.max(0) + emit[t]
    state = len(states) - 1 if score[-1] >= score[-2] else len(states) - 2  # last blank or target
    if not np.isfinite(score[state]):
        return None
    path = np.empty(steps, np.int64)
    for t in range(steps - 1, -1, -1):
        path[t] = state
        state -= came[t, state]
    on_target = np.nonzero(path % 2 == 1)[0]
    which = path[on_target] // 2
    spans = np.stack([np.full(n, steps), np.full(n, -1)], 1)
    np.minimum.at(spans[:, 0], which, on_target)
    np.maximum.at(spans[:, 1], which, on_target)
    return spans


class CtcAligner:
    """A wav2vec 2.0 CTC model and its letters: `align(words, audio)` -> each word's (start,
    end) in seconds. One alignment at a time (the server calls it from a thread of its own)."""

    def __init__(self, model: torch.nn.Module, vocab: dict[str, int], blank: int):
        self.model = model.eval()
        self.vocab, self.blank = vocab, blank
        self.upper = any(k.isupper() for k in vocab)  # the vocabulary's letters' case
        self.delimiter = vocab.get(WORD_DELIMITER)
        self.step_s = model.config.inputs_to_logits_ratio / ALIGN_RATE  # 20 ms
        self._lock = threading.Lock()

    @classmethod
    def load(cls, name: str = DEFAULT_ALIGNER, device: str | torch.device = "cpu") -> CtcAligner:
        """A wav2vec 2.0 CTC model from the hub or a local folder, with its tokenizer's vocab."""
        try:
            from transformers import AutoTokenizer, Wav2Vec2ForCTC
        except ImportError as e:
            raise RuntimeError("the word aligner needs transformers: pip install "
                               "'csm-streaming[align]' (or leave --word-aligner out: estimated "
                               "timings)") from e
        try:
            model = Wav2Vec2ForCTC.from_pretrained(name)
            tokenizer = AutoTokenizer.from_pretrained(name)
        except OSError as e:
            raise RuntimeError(f"the word aligner {name!r} could not be loaded ({e}): name a "
                               "wav2vec 2.0 CTC model on the hub or a local folder, or leave "
                               "--word-aligner out (estimated timings)") from e
        return cls(model.to(device), tokenizer.get_vocab(), tokenizer.pad_token_id)

    def to(self, device: str | torch.device) -> CtcAligner:
        """On the engine's device (a GPU aligns a phrase in milliseconds)."""
        self.model.to(device)
        return self

    def letters(self, word: str) -> list[int]:
        """A word's tokens as spoken (numbers and symbols in words: normalize_text), the
        vocabulary's letters only."""
        spoken = normalize_text(word)
        spoken = spoken.upper() if self.upper else spoken.lower()
        return [self.vocab[c] for c in spoken if c in self.vocab and c != WORD_DELIMITER]

    @torch.inference_mode()
    def log_probs(self, audio: np.ndarray) -> np.ndarray:
        """24 kHz float audio -> the CTC model's log-probabilities [T, V], one step per 20 ms."""
        import soxr

        x = soxr.resample(np.asarray(audio, np.float32), SAMPLE_RATE, ALIGN_RATE)
        x = (x - x.mean()) / np.sqrt(x.var() + 1e-7)  # as its feature extractor normalizes
        device = next(self.model.parameters()).device
        logits = self.model(torch.from_numpy(x)[None].to(device)).logits[0]
        return logits.float().log_softmax(-1).cpu().numpy()

    def align(self, words: list[str], audio: np.ndarray) -> list[tuple[float, float]] | None:
        """Each word's (start, end) in seconds from the audio's first sample; None where the
        audio is too short for the words or no word has a letter. A word with no letter of
        the vocabulary (a dash) shares the span of the next word that has (or the last)."""
        spelled = [self.letters(w) for w in words]
        units: list[list[int]] = []  # words that have letters: their indices
        waiting: list[int] = []
        for i, letters in enumerate(spelled):
            waiting.append(i)
            if letters:
                units.append(waiting)
                waiting = []
        if not units:
            return None
        units[-1] += waiting
        targets, bounds = [], []  # each unit's first and last target
        for unit in units:
            if targets and self.delimiter is not None:
                targets.append(self.delimiter)
            first = len(targets)
            targets += [t for i in unit for t in spelled[i]]
            bounds.append((first, len(targets) - 1))
        if len(audio) < SAMPLE_RATE * self.step_s:
            return None
        with self._lock:
            spans = ctc_path(self.log_probs(audio), targets, self.blank)
        if spans is None:
            return None
        times = []
        for unit, (first, last) in zip(units, bounds):
            start, end = spans[first, 0] * self.step_s, (spans[last, 1] + 1) * self.step_s
            times += share_span([words[i] for i in unit], start, end)
        return times


def share_span(words: list[str], start: float, end: float) -> list[tuple[float, float]]:
    """[start, end] shared over the words, each a share as long as the word plus the space
    after it: the estimate of their times (in order, back to back)."""
    weights = np.array([len(w) + 1 for w in words], np.float64)
    edges = start + (end - start) * np.concatenate([[0], np.cumsum(weights)]) / weights.sum()
    return list(zip(edges[:-1].tolist(), edges[1:].tolist()))
