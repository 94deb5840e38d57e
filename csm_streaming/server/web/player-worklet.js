// Plays float32 PCM pushed by the page, without gaps: a ring buffer read at the audio clock.
// Messages in: Float32Array (samples), {type: "end"} (no more audio), {type: "reset", id},
// {type: "prebuffer", samples} (how much to hold before starting, while not started).
// Messages out, ~10 times a second: {id, played, buffered, underruns, started, drained};
// underruns counts stalls: the times playback ran dry before the end.
class PcmPlayer extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const o = (options && options.processorOptions) || {};
    this.buf = new Float32Array(o.capacity || sampleRate * 120);
    this.prebuffer = o.prebuffer || Math.round(sampleRate * 0.1);
    this.reset();
    this.port.onmessage = (e) => {
      const d = e.data;
      if (d instanceof Float32Array) this.push(d);
      else if (d.type === "end") this.ended = true;
      else if (d.type === "reset") { this.reset(); this.id = d.id; }
      else if (d.type === "prebuffer" && !this.started) this.prebuffer = d.samples;
    };
  }
  reset() {
    this.written = 0; this.read = 0; this.underruns = 0;
    this.started = false; this.ended = false; this.drained = false; this.calls = 0;
    this.starved = false;
  }
  push(samples) {
    const cap = this.buf.length;
    for (let i = 0; i < samples.length; i++) this.buf[(this.written + i) % cap] = samples[i];
    this.written += samples.length;
  }
  process(inputs, outputs) {
    const out = outputs[0][0];
    const avail = this.written - this.read;
    if (!this.started && (avail >= this.prebuffer || (this.ended && avail > 0))) this.started = true;
    let n = 0;
    if (this.started) {
      n = Math.min(out.length, avail);
      const cap = this.buf.length;
      for (let i = 0; i < n; i++) out[i] = this.buf[(this.read + i) % cap];
      this.read += n;
      const starved = n < out.length && !this.ended;
      if (starved && !this.starved) this.underruns++;
      this.starved = starved;
    }
    out.fill(0, n);
    for (let c = 1; c < outputs[0].length; c++) outputs[0][c].set(out);
    if (this.ended && this.written === this.read) this.drained = true;
    if (++this.calls % 20 === 0 || this.drained) {
      this.port.postMessage({id: this.id, played: this.read, buffered: this.written - this.read,
                             underruns: this.underruns, started: this.started, drained: this.drained});
    }
    return true;
  }
}
registerProcessor("pcm-player", PcmPlayer);
