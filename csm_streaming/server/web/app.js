// The page's logic: one WebSocket request at a time, its PCM into an AudioWorklet, a live readout.
// window.csmStats holds the numbers the readout shows (the page's test reads them).
"use strict";
const SR = 24000;
const $ = (id) => document.getElementById(id);
const stats = window.csmStats = {received: 0, played: 0, buffered: 0, underruns: 0,
                                 firstAudioMs: null, rtf: null, state: "ready", error: null};
let ctx = null, node = null, ws = null, tSent = 0, expectedS = 10, replyId = 0;

// As the command line's player: faster than real time, play after a chunk and a margin;
// slower, hold enough that the end still arrives in time (expected * (1 - 1 / RTF)).
function prebufferSeconds(rtf, chunkS) {
  if (!isFinite(rtf) || rtf <= 0) return expectedS;
  if (rtf < 1) return chunkS + 0.1;
  return Math.min(expectedS, Math.max(chunkS, expectedS * (1 - 1 / rtf)) + 0.1);
}

$("token").value = localStorage.getItem("csm-token") || "";

async function loadServerInfo() {
  const voice = $("voice");
  try {
    const h = await (await fetch("/health")).json();
    $("server").textContent = `${h.device}, ${h.active_streams}/${h.slots} streams busy` +
                              (h.watermark ? ", watermarked" : "");
    for (const name of h.voices || []) voice.add(new Option(name, name));
    if (h.chat) $("chat-label").hidden = false;
  } catch (e) { $("server").textContent = "unreachable"; }
  for (let i = 0; i < 4; i++) voice.add(new Option(`speaker ${i}`, String(i)));
}

async function ensureAudio() {  // created on a click: browsers only start audio on a gesture
  if (!ctx) {
    ctx = new AudioContext({sampleRate: SR});
    await ctx.audioWorklet.addModule("/web/player-worklet.js");
    node = new AudioWorkletNode(ctx, "pcm-player", {outputChannelCount: [1]});
    node.port.onmessage = (e) => {  // reports of an earlier reply may still be on their way
      if (e.data.id === replyId) { Object.assign(stats, e.data); render(); }
    };
    node.connect(ctx.destination);
  }
  await ctx.resume();
  node.port.postMessage({type: "reset", id: ++replyId});
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
                        rtf: null, error: null, drained: false});
  $("reply-text").textContent = ""; $("reply").hidden = !$("chat").checked;
  localStorage.setItem("csm-token", $("token").value);
  try { await ensureAudio(); } catch (e) { return fail(`audio: ${e}`); }
  const v = $("voice").value, maxMs = parseFloat($("max-ms").value);
  expectedS = Math.min(isNaN(maxMs) ? 90 : maxMs / 1000, 0.08 * $("text").value.length);
  const msg = {type: $("chat").checked ? "chat" : "speech", text: $("text").value,
               token: $("token").value || null, max_audio_length_ms: isNaN(maxMs) ? null : maxMs};
  if (/^\d+$/.test(v)) msg.speaker = parseInt(v); else msg.voice = v;
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
    else if (m.type === "done") { node.port.postMessage({type: "end"}); setStatus("receiving done"); finish(); }
    else if (m.type === "error") { fail(`${m.status}: ${m.message}`); }
  };
  const socket = ws;
  ws.onclose = () => {
    if (socket === ws && (stats.state === "waiting" || stats.state === "playing")) fail("connection closed");
  };
}

function finish() { $("play").disabled = false; $("stop").disabled = true; }
function fail(text) { stats.error = text; node && node.port.postMessage({type: "end"}); setStatus(text, true); finish(); }
function stop() {
  if (ws) ws.close();
  node && node.port.postMessage({type: "reset", id: ++replyId});
  setStatus("stopped"); finish();
}

$("play").onclick = speak;
$("stop").onclick = stop;
loadServerInfo();
