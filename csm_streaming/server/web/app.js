// The page's logic: one WebSocket request at a time, its PCM into an AudioWorklet, a live readout.
// window.csmStats holds the numbers the readout shows (the page's test reads them).
"use strict";
const SR = 24000;
const $ = (id) => document.getElementById(id);
const stats = window.csmStats = {received: 0, played: 0, buffered: 0, underruns: 0,
                                 firstAudioMs: null, rtf: null, state: "ready", error: null,
                                 peakLevel: 0, request: null};
let ctx = null, node = null, analyser = null, ws = null, tSent = 0, expectedS = 10, replyId = 0;
let heard = [];  // the chunks of the last reply, for its download

// As the command line's player: faster than real time, play after a chunk and a margin;
// slower, hold enough that the end still arrives in time (expected * (1 - 1 / RTF)).
function prebufferSeconds(rtf, chunkS) {
  if (!isFinite(rtf) || rtf <= 0) return expectedS;
  if (rtf < 1) return chunkS + 0.1;
  return Math.min(expectedS, Math.max(chunkS, expectedS * (1 - 1 / rtf)) + 0.1);
}

$("token").value = localStorage.getItem("csm-token") || "";

function group(label, options) {
  const g = document.createElement("optgroup");
  g.label = label;
  for (const [text, value] of options) g.append(new Option(text, value));
  return g;
}

// The voices a request can name: from /v1/voices (it needs the token when the server has one);
// then the first speaker numbers.
async function loadServerInfo() {
  const voice = $("voice");
  let named = [], openai = [], auth = false;
  try {
    const h = await (await fetch("/health")).json();
    $("server").textContent = `${h.device}, ${h.active_streams}/${h.slots} streams busy` +
                              (h.watermark ? ", watermarked" : "");
    auth = h.auth;
    if (h.chat) $("chat-label").hidden = false;
  } catch (e) { $("server").textContent = "unreachable"; }
  try {
    const token = $("token").value;  // asked only when it can answer: no failed load logged
    const r = auth && !token ? {ok: false}
      : await fetch("/v1/voices", token ? {headers: {Authorization: `Bearer ${token}`}} : {});
    if (r.ok) {
      const list = (await r.json()).data;
      named = list.filter((v) => v.type === "named").map((v) => [`${v.id} (${v.seconds.toFixed(1)} s clip)`, v.id]);
      openai = list.filter((v) => v.type === "openai").map((v) => [`${v.id} (speaker ${v.speaker})`, v.id]);
    }
  } catch (e) { /* the numbered speakers still work */ }
  const chosen = voice.value;  // read now: a choice made while the list loaded is kept
  voice.replaceChildren();
  if (named.length) voice.append(group("Your voices", named));
  voice.append(group("Speakers", [0, 1, 2, 3].map((i) => [`speaker ${i}`, String(i)])));
  if (openai.length) voice.append(group("OpenAI names", openai));
  if ([...voice.options].some((o) => o.value === chosen)) voice.value = chosen;
}

// What a failure means for the person at the page, and what to do (the server's own words
// follow when they help).
function explain(status, message) {
  if (status === 401 || status === 403) return "The server needs its token: enter it in the Token field.";
  if (status === 408) return "The server waited too long for the request. Try again.";
  if (status === 413) return `That is more than this server takes: ${message}`;
  if (status === 503 || status === 429) return "The server is busy. Try again in a few seconds.";
  if (status === 502 || status === 504) return `The language model did not answer: ${message}`;
  if (status >= 400 && status < 500) return `Please check the request: ${message}`;
  return `Something went wrong on the server (${status}): ${message}`;
}

async function ensureAudio() {  // created on a click: browsers only start audio on a gesture
  if (!ctx) {
    ctx = new AudioContext({sampleRate: SR});
    await ctx.audioWorklet.addModule("/web/player-worklet.js");
    node = new AudioWorkletNode(ctx, "pcm-player", {outputChannelCount: [1]});
    node.port.onmessage = (e) => {  // reports of an earlier reply may still be on their way
      if (e.data.id === replyId) { Object.assign(stats, e.data); render(); }
    };
    analyser = new AnalyserNode(ctx, {fftSize: 1024});
    node.connect(analyser);
    analyser.connect(ctx.destination);
    requestAnimationFrame(showLevel);
  }
  await ctx.resume();
  node.port.postMessage({type: "reset", id: ++replyId});
}

function showLevel() {  // the loudness of what plays now: a bar that moves with the voice
  const x = new Float32Array(analyser.fftSize);
  analyser.getFloatTimeDomainData(x);
  const rms = Math.sqrt(x.reduce((a, v) => a + v * v, 0) / x.length);
  stats.peakLevel = Math.max(stats.peakLevel, rms);
  $("level-bar").style.width = `${Math.min(100, rms * 400)}%`;
  requestAnimationFrame(showLevel);
}

function wavBlob(chunks) {  // 16-bit mono WAV of what was heard
  const n = chunks.reduce((a, c) => a + c.length, 0), view = new DataView(new ArrayBuffer(44 + 2 * n));
  const text = (at, t) => [...t].forEach((ch, i) => view.setUint8(at + i, ch.charCodeAt(0)));
  text(0, "RIFF"); view.setUint32(4, 36 + 2 * n, true); text(8, "WAVEfmt ");
  view.setUint32(16, 16, true); view.setUint16(20, 1, true); view.setUint16(22, 1, true);
  view.setUint32(24, SR, true); view.setUint32(28, 2 * SR, true); view.setUint16(32, 2, true);
  view.setUint16(34, 16, true); text(36, "data"); view.setUint32(40, 2 * n, true);
  let at = 44;
  for (const c of chunks) for (const v of c) { view.setInt16(at, Math.max(-1, Math.min(1, v)) * 32767, true); at += 2; }
  return new Blob([view], {type: "audio/wav"});
}

function offerDownload() {
  const link = $("download");
  if (link.href) URL.revokeObjectURL(link.href);
  link.href = URL.createObjectURL(wavBlob(heard));
  link.hidden = heard.length === 0;
}

function setStatus(text, error) {
  stats.state = text;
  $("status").textContent = text;
  $("status").className = error ? "error" : "";
}

function render() {
  $("first-audio").textContent = stats.firstAudioMs == null ? "-" : `${stats.firstAudioMs.toFixed(0)} ms`;
  $("rtf").textContent = stats.rtf == null ? "-" : stats.rtf.toFixed(3);
  $("received").textContent = `${(stats.received / SR).toFixed(2)} s`;
  $("buffered").textContent = `${(stats.buffered / SR * 1000).toFixed(0)} ms`;
  $("buffer-bar").style.width = `${Math.min(100, stats.buffered / SR * 50)}%`;
  $("underruns").textContent = String(stats.underruns);
  if (stats.drained && stats.state === "receiving done") setStatus("done");
}

async function speak() {
  $("play").disabled = true; $("stop").disabled = false;
  Object.assign(stats, {received: 0, played: 0, buffered: 0, underruns: 0, firstAudioMs: null,
                        rtf: null, error: null, drained: false, peakLevel: 0});
  heard = []; $("download").hidden = true;
  $("reply-text").textContent = ""; $("reply").hidden = !$("chat").checked;
  localStorage.setItem("csm-token", $("token").value);
  if (!$("text").value.trim()) return fail("Type something for it to say first.");
  try { await ensureAudio(); } catch (e) { return fail(`Your browser could not start audio: ${e.message || e}`); }
  const v = $("voice").value, maxMs = parseFloat($("max-ms").value);
  expectedS = Math.min(isNaN(maxMs) ? 90 : maxMs / 1000, 0.08 * $("text").value.length);
  const msg = {type: $("chat").checked ? "chat" : "speech", text: $("text").value,
               token: $("token").value || null, max_audio_length_ms: isNaN(maxMs) ? null : maxMs};
  for (const [id, field, parse] of [["temperature", "temperature", parseFloat],
                                    ["top-k", "top_k", (x) => parseInt(x, 10)],
                                    ["seed", "seed", (x) => parseInt(x, 10)]]) {
    const value = parse($(id).value);
    if (!isNaN(value)) msg[field] = value;
  }
  if (/^\d+$/.test(v)) msg.speaker = parseInt(v); else msg.voice = v;
  const {token: _, ...shown} = msg;
  stats.request = shown;
  if (msg.type === "chat" && ws && ws.readyState === WebSocket.OPEN && ws.chat) {
    tSent = performance.now();  // the same chat session: the server remembers the dialogue
    const {token, ...turn} = msg;  // the socket is already authenticated
    ws.send(JSON.stringify(turn));
    setStatus("waiting");
    return;
  }
  if (ws) ws.close();
  ws = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/v1/stream`);
  ws.chat = msg.type === "chat";
  ws.binaryType = "arraybuffer";
  ws.onopen = () => { tSent = performance.now(); ws.send(JSON.stringify(msg)); setStatus("waiting"); };
  ws.onmessage = (e) => {
    if (e.data instanceof ArrayBuffer) {
      const pcm = new Int16Array(e.data), f = new Float32Array(pcm.length);
      for (let i = 0; i < pcm.length; i++) f[i] = pcm[i] / 32767;
      heard.push(f.slice());  // kept for the download; f itself goes to the worklet
      node.port.postMessage(f, [f.buffer]);
      const now = performance.now();
      if (stats.firstAudioMs == null) stats.firstAudioMs = now - tSent;
      stats.received += pcm.length;
      stats.rtf = (now - tSent) / 1000 / (stats.received / SR);
      const samples = Math.round(prebufferSeconds(stats.rtf, pcm.length / SR) * SR);
      node.port.postMessage({type: "prebuffer", samples});
      setStatus("playing"); render();
      return;
    }
    const m = JSON.parse(e.data);
    if (m.type === "text") { $("reply-text").textContent += m.delta; }
    else if (m.type === "done") { node.port.postMessage({type: "end"}); setStatus("receiving done"); offerDownload(); finish(); }
    else if (m.type === "error") { fail(explain(m.status, m.message), `${m.status}: ${m.message}`); }
  };
  const socket = ws;
  ws.onclose = () => {
    if (socket === ws && (stats.state === "waiting" || stats.state === "playing")) {
      fail("The connection to the server was lost. Is it still running?", "connection closed");
    }
  };
}

function finish() { $("play").disabled = false; $("stop").disabled = true; }
// shown: what the person reads; error (stats.error): what happened, for a bug report or a test
function fail(shown, error) {
  stats.error = error || shown;
  node && node.port.postMessage({type: "end"});
  setStatus(shown, true); finish();
}
function stop() {
  if (ws) ws.close();
  node && node.port.postMessage({type: "reset", id: ++replyId});
  setStatus("stopped"); finish();
}

$("play").onclick = speak;
$("stop").onclick = stop;
$("token").onchange = loadServerInfo;  // the voices list needs it on a server with a token
loadServerInfo();
