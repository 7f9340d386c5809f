// The live view of promoe's expert cache: follows GET /v1/cache/events (server-sent events, a few a second while
// this page is open), draws the cache as MoE layers x experts and four sparklines, and streams a completion.
// Plain script, nothing fetched from elsewhere.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const WINDOW_S = 60; // seconds of history per sparkline
  const MIN_WINDOW_S = 15; // a shorter history is drawn on this scale
  const series = { hit: [], stall: [], goodpred: [], link: [] };
  let cells = null; // cells[layer][expert], rebuilt when the geometry changes
  let labels = [];
  let previous = null; // the last snapshot, for rates

  function authHeaders(extra) {
    const key = $("api-key").value.trim();
    return key ? { ...extra, Authorization: `Bearer ${key}` } : { ...extra };
  }

  function fmt(value, digits = 2) {
    return value === null || value === undefined || Number.isNaN(value) ? "–" : Number(value).toFixed(digits);
  }

  function setStatus(text, error = false) {
    const status = $("status");
    status.textContent = text;
    status.classList.toggle("error", error);
  }

  // Server-sent events read from a fetch() response (so that an API key can go with them): onEvent(name, data).
  async function readEvents(response, onEvent) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        let name = "message";
        const data = [];
        for (const line of block.split("\n")) {
          if (line.startsWith("event:")) name = line.slice(6).trim();
          else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
        }
        if (data.length) onEvent(name, data.join("\n"));
      }
    }
  }

  // ------------------------------------------------------------------ the grid
  function buildGrid(layers, experts) {
    const grid = $("grid");
    grid.replaceChildren();
    grid.style.gridTemplateColumns = `auto repeat(${experts}, minmax(6px, 1fr))`;
    cells = [];
    labels = [];
    for (let layer = 0; layer < layers; layer++) {
      const label = document.createElement("div");
      label.className = "label";
      label.textContent = `L${layer}`;
      grid.append(label);
      labels.push(label);
      const row = [];
      for (let expert = 0; expert < experts; expert++) {
        const cell = document.createElement("div");
        cell.className = "cell";
        cell.dataset.layer = layer;
        cell.dataset.expert = expert;
        cell.title = `MoE layer ${layer}, expert ${expert}`;
        grid.append(cell);
        row.push(cell);
      }
      cells.push(row);
    }
  }

  function paintGrid(snap) {
    const layers = snap.resident.length;
    if (!cells || cells.length !== layers || cells[0].length !== snap.experts_per_layer) {
      buildGrid(layers, snap.experts_per_layer);
    }
    const state = cells.map((row) => row.map(() => new Set()));
    for (const name of ["resident", "loading", "predicted", "evicted"]) {
      snap[name].forEach((experts, layer) => experts.forEach((e) => state[layer][e].add(name)));
    }
    cells.forEach((row, layer) => row.forEach((cell, expert) => {
      const s = state[layer][expert];
      const main = s.has("loading") ? "loading" : s.has("resident") ? "resident" : s.has("evicted") ? "evicted" : "";
      cell.className = `cell ${main}${s.has("predicted") ? " predicted" : ""}`;
      cell.dataset.state = [...s].sort().join(" ") || "none";
    }));
    labels.forEach((label, layer) => label.classList.toggle("current", snap.request_id !== null && layer === snap.layer));
    const count = (name) => snap[name].reduce((n, experts) => n + experts.length, 0);
    document.body.dataset.resident = count("resident");
    $("grid-note").textContent = `${layers} MoE layers x ${snap.experts_per_layer} experts · ` +
      `${count("resident")} resident, ${count("loading")} loading, ${count("predicted")} predicted, ` +
      `${count("evicted")} recently evicted`;
    const where = snap.request_id === null ? "idle" :
      `request ${snap.request_id}: ${snap.step < 0 ? "starting" : `token ${snap.step}, MoE layer ${snap.layer}`}`;
    setStatus(`${snap.policy} · ${snap.cache_experts} slots · ${where}`);
  }

  // ------------------------------------------------------------------ sparklines
  function push(name, t, value) {
    const s = series[name];
    s.push({ t, v: value === undefined ? null : value });
    while (s.length > 2 && s[1].t < t - WINDOW_S) s.shift(); // one point older than the window stays, for its edge
  }

  // A line over time: the last WINDOW_S seconds (a shorter history fills the width from the left as it grows).
  function drawSpark(name, ratio) {
    const canvas = $(`s-${name}`);
    const scale = window.devicePixelRatio || 1;
    const width = canvas.clientWidth * scale;
    const height = canvas.clientHeight * scale;
    if (canvas.width !== width || canvas.height !== height) {
      canvas.width = width;
      canvas.height = height;
    }
    const ctx = canvas.getContext("2d");
    ctx.clearRect(0, 0, width, height);
    const points = series[name];
    if (!points.length) return;
    const last = points[points.length - 1].t;
    const first = Math.max(points[0].t, last - WINDOW_S);
    const start = Math.min(first, last - MIN_WINDOW_S);
    const span = Math.max(last - start, 1e-9);
    const known = points.filter((p) => p.v !== null).map((p) => p.v);
    const top = ratio ? 1 : Math.max(1e-9, ...known) * 1.1;
    const x = (t) => Math.max(0, (t - start) / span) * width;
    const y = (v) => height - 2 * scale - (v / top) * (height - 4 * scale);
    ctx.strokeStyle = getComputedStyle(document.documentElement).getPropertyValue("--predicted");
    ctx.lineWidth = 1.5 * scale;
    ctx.beginPath();
    let drawing = false;
    for (const p of points) {
      if (p.v === null) { drawing = false; continue; }
      if (drawing) ctx.lineTo(x(p.t), y(p.v));
      else ctx.moveTo(x(p.t), y(p.v));
      drawing = true;
    }
    ctx.stroke();
  }

  function plot(snap) {
    const totals = snap.totals || {};
    const request = snap.request || {};
    const running = snap.request_id !== null;
    const t = snap.uptime_s;
    if (previous && t < previous.uptime_s) { // a new coordinator (the runtime restarted): a new history
      Object.values(series).forEach((s) => s.splice(0));
      previous = null;
    }
    // the running request's hit rate is live (counted at every gate); stall is known only once a request ends
    const hit = running && request.hit_rate !== undefined && request.hit_rate !== null ?
      request.hit_rate : totals.hit_rate;
    push("hit", t, hit);
    const stall = totals.tokens_generated ? totals.stall_ms / totals.tokens_generated : null;
    push("stall", t, stall);
    const goodpred = running && request.goodpred !== undefined ? request.goodpred : totals.goodpred;
    push("goodpred", t, goodpred);
    let link = null;
    if (previous && snap.uptime_s > previous.uptime_s) {
      const bytesPerS = ((totals.bytes_loaded || 0) - (previous.totals.bytes_loaded || 0)) /
        (snap.uptime_s - previous.uptime_s);
      link = snap.link_gbps ? bytesPerS / (snap.link_gbps * 1e9) : bytesPerS / 1e6;
    }
    push("link", t, link);
    previous = snap;
    $("v-hit").textContent = fmt(hit, 3);
    $("v-stall").textContent = stall === null ? "–" : `${fmt(stall)} ms`;
    $("v-goodpred").textContent = fmt(goodpred, 3);
    $("v-link").textContent = link === null ? "–" : snap.link_gbps ? `${fmt(100 * link, 0)} %` : `${fmt(link, 1)} MB/s`;
    $("link-note").textContent = snap.link_gbps ?
      `utilisation of the ${snap.link_gbps} GB/s link` : "MB/s loaded (no --link-gbps: utilisation unknown)";
    drawSpark("hit", true);
    drawSpark("stall", false);
    drawSpark("goodpred", true);
    drawSpark("link", Boolean(snap.link_gbps));
  }

  async function follow() {
    for (;;) {
      try {
        const response = await fetch("/v1/cache/events", { headers: authHeaders({ Accept: "text/event-stream" }) });
        if (response.ok) {
          await readEvents(response, (name, data) => {
            if (name !== "cache") return;
            const snap = JSON.parse(data);
            if (snap.error) { setStatus(`coordinator: ${snap.error.message}`, true); return; }
            paintGrid(snap);
            plot(snap);
          });
          setStatus("cache feed closed; reconnecting…", true);
        } else {
          setStatus(response.status === 401 ? "the server wants an API key (enter it on the right)" :
            `cache feed: HTTP ${response.status}`, true);
        }
      } catch (err) {
        setStatus(`cache feed lost (${err.message}); reconnecting…`, true);
      }
      await new Promise((resolve) => setTimeout(resolve, 2000));
    }
  }

  // ------------------------------------------------------------------ the prompt box
  async function complete(event) {
    event.preventDefault();
    const out = $("output");
    out.textContent = "";
    out.classList.remove("error");
    out.dataset.tokens = "0";
    delete out.dataset.finished;
    $("done").textContent = "";
    $("send").disabled = true;
    try {
      const response = await fetch("/v1/completions", {
        method: "POST",
        headers: authHeaders({ "Content-Type": "application/json" }),
        body: JSON.stringify({ model: "promoe", prompt: $("prompt").value, stream: true,
          max_tokens: Number($("max-tokens").value), temperature: Number($("temperature").value) }),
      });
      if (!response.ok) {
        const body = await response.json().catch(() => ({}));
        throw new Error(`HTTP ${response.status}: ${body.error ? body.error.message : response.statusText}`);
      }
      await readEvents(response, (name, data) => {
        if (data === "[DONE]") return;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(`${chunk.error.code}: ${chunk.error.message}`);
        const choice = chunk.choices && chunk.choices[0];
        if (!choice) return;
        if (choice.text) {
          out.textContent += choice.text;
          out.dataset.tokens = Number(out.dataset.tokens) + 1;
          out.scrollTop = out.scrollHeight;
        }
        if (choice.finish_reason) {
          const m = chunk.promoe || {};
          out.dataset.tokens = (m.token_ids || []).length;
          out.dataset.finished = choice.finish_reason;
          $("done").textContent = `${out.dataset.tokens} tokens (${choice.finish_reason}) · TTFT ${fmt(m.ttft_ms, 1)} ms` +
            ` · TPOT ${fmt(m.tpot_ms, 1)} ms · hit rate ${fmt(m.hit_rate, 3)} · stall ${fmt(m.stall_ms, 1)} ms` +
            ` · GoodPred ${fmt(m.goodpred, 3)}`;
        }
      });
    } catch (err) {
      out.classList.add("error");
      out.textContent += `\n${err.message}`;
    } finally {
      $("send").disabled = false;
    }
  }

  $("prompt-form").addEventListener("submit", complete);
  follow();
})();
