"""Talking to it: an LLM's reply spoken while it is written, through the real SDKs (openai,
google-genai) against local servers that speak their streaming wire formats."""

import time

import pytest
import torch

from conftest import patch_sample_frame, speech_like
from csm_streaming.chat.conversation import Conversation, Dialogue
from csm_streaming.chat.llm import LLMConfig, LLMError, stream_reply
from csm_streaming.engine.config import StreamingConfig
from csm_streaming.engine.frontend import StreamingGenerator
from csm_streaming.engine.segmenting import TextChunker, clean_markdown
from csm_streaming.request import SamplingParams
from llm_stubs import LLMStub

REPLY = ["Hello", " there,", " friend.", " I am", " really glad", " that you", " asked me",
         " about", " it.", " Mars is", " a cold", " and very", " dusty", " planet", " today."]


@pytest.fixture
def speaking(own_generator):
    """A streaming generator whose random model ends each sentence after five frames (an end
    frame at every draw counter = 5 mod 6: a segment starts at frames-said + its index)."""
    patch_sample_frame(own_generator.model, lambda codes, s: torch.where(
        (s.frame % 6 == 5)[:, None], torch.zeros_like(codes), codes))
    return StreamingGenerator(own_generator, StreamingConfig(max_batch_size=2))


@pytest.mark.parametrize("kind", ["openai", "gemini"])
def test_audio_starts_before_the_llm_finishes_and_equals_the_same_sentences(speaking, kind):
    stub = LLMStub(kind, REPLY, delay=0.25)
    try:
        conv = Conversation(speaking, stub.config(), speaker=1,
                            sampling=SamplingParams(seed=7))
        context, seed = conv.context(), conv.turn_sampling().seed
        t0 = time.perf_counter()
        chunks, first_at = [], None
        for chunk in conv.speak_reply("Tell me about Mars."):
            first_at = first_at or time.perf_counter()
            chunks.append(chunk)
    finally:
        stub.close()
    assert first_at < stub.sent_last_at, "audio should start before the LLM's last token"
    pieces = conv.reply.pieces
    assert pieces[0] == "Hello there," and len(pieces) >= 3  # the first clause went at once
    assert " ".join(pieces) == clean_markdown("".join(REPLY))
    m = conv.metrics
    assert m.llm_first_piece_s < m.first_audio_s < stub.sent_last_at - t0
    assert 0 < m.llm_wait_share < 1
    direct = torch.cat(list(speaking.generate_streaming(pieces, 1, context, seed=seed)))
    torch.testing.assert_close(torch.cat(chunks), direct, atol=1e-4, rtol=0)
    sent = stub.requests[-1]
    if kind == "openai":
        assert sent["path"] == "/v1/chat/completions" and sent["body"]["stream"] is True
        assert sent["body"]["messages"][0]["role"] == "system"
        assert sent["body"]["messages"][-1] == {"role": "user", "content": "Tell me about Mars."}
    else:
        assert sent["path"].endswith("/models/stub-model:streamGenerateContent?alt=sse")
        assert sent["headers"]["x-goog-api-key"] == "stub-key"
        assert sent["body"]["contents"][-1]["parts"][0]["text"] == "Tell me about Mars."
        assert "systemInstruction" in sent["body"]


def test_the_next_turn_carries_the_previous_replys_audio(speaking, mimi):
    """The voice stays: turn 2 is conditioned on the voice's clip, turn 1's text and the exact
    codes CSM said; the LLM sees the whole dialogue."""
    from csm_streaming.engine.voices import Voice
    from csm_streaming.request import Segment

    clip = speech_like(0.6, seed=4)
    codes = speaking.generator.encode_audio(clip)
    text = "This is how I sound."
    voice = Voice("anna", 2, text, Segment(2, text, codes=codes))
    stub = LLMStub("openai", ["First", " answer", " here."], delay=0.01)
    try:
        conv = Conversation(speaking, stub.config(), voice=voice,
                            sampling=SamplingParams(seed=3))
        list(conv.speak_reply("One?"))
        first = conv.turns[-1]
        assert (first.role, first.speaker, first.text) == ("assistant", 2, "First answer here.")
        assert torch.equal(first.codes, speaking.engine.last_stream.all_codes)
        stub.tokens = ["Second", " one", " now."]
        context, seed = conv.context(), conv.turn_sampling().seed
        assert [s.text for s in context] == ["This is how I sound.", "One?", "First answer here."]
        assert torch.equal(context[0].codes, codes) and torch.equal(context[2].codes, first.codes)
        second = torch.cat(list(conv.speak_reply("Two?")))
    finally:
        stub.close()
    assert [m["content"] for m in stub.requests[-1]["body"]["messages"][1:]] == [
        "One?", "First answer here.", "Two?"]
    direct = torch.cat(list(speaking.generate_streaming(["Second one now."], 2, context,
                                                        seed=seed)))
    torch.testing.assert_close(second, direct, atol=1e-4, rtol=0)
    assert seed == 4 and len(conv.turns) == 4


@pytest.mark.parametrize("kind", ["openai", "gemini"])
@pytest.mark.parametrize("fail, words", [(401, "refused the API key (401): check"),
                                         (500, "failed the request (500)"),
                                         ("hang", "did not answer within 1 s"),
                                         ("down", "cannot reach")])
def test_a_provider_failure_is_clear_and_the_conversation_goes_on(speaking, kind, fail, words):
    stub = LLMStub(kind, ["Fine,", " thanks."], delay=0.01)
    try:
        config = stub.config(timeout_s=1.0)
        if fail == "down":
            from dataclasses import replace

            down = "http://127.0.0.1:9" + ("/v1" if kind == "openai" else "")
            config = replace(config, base_url=down)
        else:
            stub.fail = fail
        conv = Conversation(speaking, config, sampling=SamplingParams(seed=1))
        with pytest.raises(LLMError, match=words.replace("(", r"\(").replace(")", r"\)")):
            list(conv.speak_reply("Hello?"))
        assert conv.turns == [] and speaking.engine.free_slots == 2  # nothing half-said is kept
        stub.fail = None
        conv.llm = stub.config()
        audio = torch.cat(list(conv.speak_reply("Hello again?")))
    finally:
        stub.close()
    assert audio.numel() and [t.role for t in conv.turns] == ["user", "assistant"]


@pytest.mark.parametrize("kind", ["openai", "gemini"])
@pytest.mark.parametrize("fail, model, what, status", [
    (None, "stub-model", None, None),
    (401, "stub-model", "key", 502),
    (None, "no-such-model", "model", 502),
    ("hang", "stub-model", "timeout", 504),
    ("down", "stub-model", "unreachable", 503),
])
def test_the_check_says_which_is_wrong_within_seconds(kind, fail, model, what, status):
    from dataclasses import replace

    from csm_streaming.chat.llm import check

    stub = LLMStub(kind, ["Hi."])
    try:
        config = replace(stub.config(), model=model)
        if fail == "down":
            config = replace(config, base_url="http://127.0.0.1:9" + stub.base_url[-3:] * (
                kind == "openai"))
        else:
            stub.fail = fail
        if what is None:
            check(config)  # a good key, a known model: no error
            return
        with pytest.raises(LLMError) as e:
            check(config, timeout_s=1.0)
    finally:
        stub.close()
    assert e.value.kind == what and e.value.http_status == status
    if what == "timeout":  # the check's own short wait, not the 30 s of a reply
        assert "did not answer within 1 s" in str(e.value)
    if what == "model":
        assert "no-such-model" in str(e.value)


def test_configuration_from_the_environment(monkeypatch):
    for var in ("GOOGLE_API_KEY", "GEMINI_API_KEY", "OPENAI_BASE_URL", "OPENAI_API_KEY",
                "GEMINI_MODEL", "OPENAI_MODEL"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(LLMError, match="no language model is configured: set GOOGLE_API_KEY"):
        LLMConfig.from_env()
    monkeypatch.setenv("OPENAI_BASE_URL", "http://localhost:11434/v1")
    monkeypatch.setenv("OPENAI_MODEL", "llama3.2")
    c = LLMConfig.from_env()
    assert (c.provider, c.model, c.base_url) == ("openai", "llama3.2", "http://localhost:11434/v1")
    monkeypatch.setenv("GOOGLE_API_KEY", "g")
    assert LLMConfig.from_env().provider == "gemini"  # Gemini first when its key is there
    assert LLMConfig.from_env("openai").model == "llama3.2"
    with pytest.raises(LLMError, match="unknown LLM provider"):
        LLMConfig.from_env("claude")
    with pytest.raises(LLMError, match="must end with the user's message"):
        list(stream_reply(c, []))
    for var in ("GOOGLE_API_KEY", "OPENAI_BASE_URL"):
        monkeypatch.delenv(var)
    with pytest.raises(LLMError, match="OpenAI needs an API key: set OPENAI_API_KEY"):
        LLMConfig.from_env("openai")  # not "cannot reach": the key is what is missing


def test_the_chunker_cuts_at_clauses_first_then_sentences():
    ch = TextChunker()
    out = []
    for delta in "Well, that is a **good** question. Dr. Smith says 3.5 is fine, really. Bye":
        out += ch.feed(delta)
    out += ch.flush()
    # "Dr." and "3.5" do not end a sentence; a sentence under 40 characters waits for the next
    assert out == ["Well, that is a good question.", "Dr. Smith says 3.5 is fine, really. Bye"]
    ch = TextChunker()
    first = [p for d in ["Sure, ", "my good friend, ", "here is more."] for p in ch.feed(d)]
    assert first == ["Sure, my good friend,"]  # the first clause end past 12 characters
    long = TextChunker(clause_chars=50, max_chars=60)
    pieces = long.feed("word " * 40) + long.flush()
    assert all(len(p) <= 60 for p in pieces) and " ".join(pieces) == " ".join(["word"] * 40)
    assert clean_markdown("# Title\n- *one*\n- `two`\n[link](http://x)") == "Title one two link"


def test_the_dialogue_keeps_the_voice_and_drops_the_oldest_turns():
    from csm_streaming.engine.voices import Voice
    from csm_streaming.request import Segment

    voice = Voice("v", 0, "ref", Segment(0, "ref", codes=torch.zeros(50, 32, dtype=torch.long)))
    d = Dialogue(voice)
    for i in range(10):
        d.add(f"question {i}", f"answer {i}", torch.zeros(30, 32, dtype=torch.long))
    ctx = d.context(lambda text, speaker: 5, window=512)  # 256 positions for the dialogue
    assert ctx[0] is voice.segment  # always first, always kept
    texts = [s.text for s in ctx[1:]]
    assert texts[-1] == "answer 9" and "question 0" not in texts
    used = 56 + sum(5 + (31 if s.codes is not None else 0) for s in ctx[1:])
    assert used <= 256 and used + 36 + 5 > 256  # as many turns as fit, no more
