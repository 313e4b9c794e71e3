// The live page: sessions from GET /sessions, one session's live transcript from its
// subscriber socket, who speaks and the audio level from /sessions, who spoke when from
// /sessions/{key}/timeline, links to its files from /sessions/{key}/files, and a say box
// on the control socket. Plain DOM, no framework, no network beyond this gateway.
// Untrusted text (speaker names, words) only ever goes through textContent.
"use strict";

const params = new URLSearchParams(location.hash.slice(1));
const readToken = params.get("token") || params.get("read") || "";
const controlToken = params.get("control") || "";
const COLOURS = ["#2f6fde", "#d9480f", "#2b8a3e", "#ae3ec9", "#c2255c", "#1098ad", "#e67700", "#5f3dc4"];

const state = { config: { open: true }, selected: null, socket: null, control: null, colours: new Map() };

function $(id) { return document.getElementById(id); }

function colour(name) {
  if (!state.colours.has(name)) state.colours.set(name, COLOURS[state.colours.size % COLOURS.length]);
  return state.colours.get(name);
}

function clock(seconds) {
  const s = Math.floor(seconds), m = Math.floor(s / 60), h = Math.floor(m / 60);
  const two = (n) => String(n).padStart(2, "0");
  return h ? `${h}:${two(m % 60)}:${two(s % 60)}` : `${two(m)}:${two(s % 60)}`;
}

function wsUrl(path, token) {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const query = token ? `?token=${encodeURIComponent(token)}` : "";
  return `${scheme}//${location.host}${path}${query}`;
}

// With a secret set, /sessions and the timelines need the read token too.
function readHeaders() {
  return readToken ? { Authorization: `Bearer ${readToken}` } : {};
}

function cell(row, text) {
  const td = document.createElement("td");
  td.textContent = text;
  row.appendChild(td);
  return td;
}

async function refreshSessions() {
  let sessions;
  try {
    const r = await fetch("/sessions", { cache: "no-store", headers: readHeaders() });
    if (r.status === 401 || r.status === 403) {
      $("status").textContent = "this gateway needs a read token: open it as /#token=<read token>";
      return;
    }
    sessions = await r.json();
    $("status").textContent = `${sessions.length} session${sessions.length === 1 ? "" : "s"}`;
  } catch (e) {
    $("status").textContent = "gateway unreachable";
    return;
  }
  const body = document.querySelector("#sessions tbody");
  body.replaceChildren();
  $("no-sessions").hidden = sessions.length > 0;
  for (const s of sessions) {
    const row = document.createElement("tr");
    row.dataset.key = s.key;
    if (s.key === state.selected) row.classList.add("selected");
    cell(row, s.key);
    cell(row, s.state);
    cell(row, clock(s.audio_seconds || 0));
    cell(row, (s.speakers || []).join(", ") || "–");
    const health = Object.entries(s.pipelines || {}).map(([n, h]) => `${n}: ${h}`).join(", ");
    cell(row, health || "–");
    row.addEventListener("click", () => select(s.key));
    body.appendChild(row);
    if (s.key === state.selected) showLive(s);
  }
  if (!state.selected && sessions.length) select(sessions[0].key);
}

function showLive(s) {
  const speaking = $("speaking");
  speaking.replaceChildren();
  for (const name of s.speaking || []) {
    const tag = document.createElement("span");
    tag.textContent = name;
    tag.style.background = colour(name);
    speaking.appendChild(tag);
  }
  if (!speaking.childElementCount) speaking.textContent = "nobody";
  const db = s.level_db;
  const width = db === null || db === undefined ? 0 : Math.max(0, Math.min(100, (db + 60) / 60 * 100));
  $("level").style.width = `${width}%`;
  $("level-text").textContent = db === null || db === undefined ? "no audio" : `${db} dBFS`;
}

async function refreshTimeline() {
  if (!state.selected) return;
  let data;
  try {
    const r = await fetch(`/sessions/${encodeURIComponent(state.selected)}/timeline`, {
      cache: "no-store", headers: readHeaders(),
    });
    if (!r.ok) return;
    data = await r.json();
  } catch (e) { return; }
  const box = $("timeline");
  box.replaceChildren();
  const total = Math.max(data.audio_seconds, 1);
  for (const sp of data.speakers) {
    const row = document.createElement("div");
    row.className = "row";
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = sp.name;
    row.appendChild(name);
    for (const [a, b] of sp.intervals) {
      const bar = document.createElement("div");
      bar.className = "bar";
      bar.style.left = `${a / total * 100}%`;
      bar.style.width = `${Math.max(0.3, (b - a) / total * 100)}%`;
      bar.style.background = colour(sp.name);
      bar.title = `${sp.name} ${clock(a)}–${clock(b)}`;
      row.appendChild(bar);
    }
    box.appendChild(row);
  }
}

function size(bytes) {
  if (bytes < 1024) return `${bytes} B`;
  if (bytes < 1024 * 1024) return `${(bytes / 1024).toFixed(1)} KiB`;
  return `${(bytes / 1024 / 1024).toFixed(1)} MiB`;
}

async function refreshFiles() {
  if (!state.selected) return;
  const base = `/sessions/${encodeURIComponent(state.selected)}/files`;
  let files;
  try {
    const r = await fetch(base, { cache: "no-store", headers: readHeaders() });
    if (!r.ok) return;
    files = await r.json();
  } catch (e) { return; }
  const box = $("files");
  box.replaceChildren();
  if (!files.length) box.textContent = "none yet";
  // A link cannot carry a header: the read token goes in its query.
  const query = readToken ? `?token=${encodeURIComponent(readToken)}` : "";
  for (const f of files) {
    const a = document.createElement("a");
    a.href = `${base}/${encodeURIComponent(f.name)}${query}`;
    a.textContent = f.name;
    a.title = size(f.bytes);
    box.appendChild(a);
  }
  // The recording plays in the page; the gateway answers the player's Range requests.
  // Set once per session, so playing is not cut by the next refresh.
  const player = $("recording");
  const wav = files.some((f) => f.name === "audio.wav");
  const src = `${base}/audio.wav${query}`;
  if (wav && player.dataset.src !== src) {
    player.dataset.src = src;
    player.src = src;
  }
  player.hidden = !wav;
}

function line(message) {
  const alt = message.channel.alternatives[0];
  const p = document.createElement("p");
  const time = document.createElement("span");
  time.className = "time";
  time.textContent = clock(message.start || 0);
  const who = document.createElement("span");
  who.className = "who";
  const name = message.speaker_name || "Unknown";
  who.textContent = name;
  who.style.color = colour(name);
  const text = document.createElement("span");
  text.className = "text";
  text.textContent = alt.transcript;
  p.append(time, who, text);
  return p;
}

// A gateway restarting with the meeting on closes readers with 1012; one killed drops the
// connection (1006). Either way the page reconnects, retrying for up to RESTART_WAIT ms,
// and keeps the transcript shown until the new connection replays it from the first final.
const RESTART = 1012;
const LOST = 1006;
const RESTART_WAIT = 120000;

function follow(key, restarting = null) {
  if (state.socket) state.socket.close();
  if (restarting === null) $("transcript").replaceChildren();
  $("partial").textContent = restarting === null ? "" : "(away from the gateway: reconnecting)";
  const socket = new WebSocket(wsUrl(`/bots/${encodeURIComponent(key)}/transcripts`, readToken));
  state.socket = socket;
  let replayed = restarting === null;
  socket.onopen = () => { restarting = null; };
  socket.onmessage = (event) => {
    const message = JSON.parse(event.data);
    if (!replayed) {
      $("transcript").replaceChildren();
      replayed = true;
    }
    if (message.type !== "Results" || !message.channel.alternatives[0].words.length) return;
    if (message.is_final) {
      const box = $("transcript");
      const stick = box.scrollTop + box.clientHeight >= box.scrollHeight - 4;
      const name = message.speaker_name || "Unknown";
      const last = box.lastElementChild;
      if (last && last.dataset.open === "1" && last.dataset.speaker === name) {
        // Finals come a few words at a time: one paragraph per turn reads better.
        last.querySelector(".text").textContent += " " + message.channel.alternatives[0].transcript;
      } else {
        const p = line(message);
        p.dataset.speaker = name;
        box.appendChild(p);
      }
      box.lastElementChild.dataset.open = message.speech_final ? "0" : "1";
      if (stick) box.scrollTop = box.scrollHeight;
      $("partial").textContent = "";
    } else {
      const name = message.speaker_name || "Unknown";
      $("partial").textContent = `${name}: ${message.channel.alternatives[0].transcript}`;
    }
  };
  socket.onclose = (event) => {
    if (state.socket !== socket) return;
    // Since when it is away: a failed attempt keeps the outage's start, so retries end.
    const since = restarting ?? (event.code === RESTART || event.code === LOST ? Date.now() : null);
    if (since !== null && Date.now() - since < RESTART_WAIT) {
      $("partial").textContent = "(away from the gateway: reconnecting)";
      setTimeout(() => { if (state.socket === socket) follow(key, since); }, 1000);
    } else if (event.code !== 1000) {
      $("partial").textContent = `(transcript closed: ${event.code} ${event.reason})`;
    }
  };
}

function select(key) {
  if (state.selected === key) return;
  state.selected = key;
  $("session-panel").hidden = false;
  $("session-title").textContent = key;
  $("say").hidden = !(state.config.open || controlToken);
  follow(key);
  refreshSessions();
  refreshTimeline();
  refreshFiles();
}

function say(event) {
  event.preventDefault();
  const text = $("say-text").value.trim();
  if (!text || !state.selected) return;
  const socket = new WebSocket(wsUrl(`/bots/${encodeURIComponent(state.selected)}/control`, controlToken));
  socket.onopen = () => socket.send(JSON.stringify({ type: "say", text }));
  socket.onmessage = (e) => {
    const reply = JSON.parse(e.data);
    $("say-status").textContent = reply.type === "error" ? reply.error : reply.type;
    if (["finished", "interrupted", "cancelled", "failed", "error"].includes(reply.type)) socket.close();
  };
  $("say-text").value = "";
}

async function start() {
  try {
    state.config = await (await fetch("/page/config.json", { cache: "no-store" })).json();
  } catch (e) { /* keep the defaults */ }
  $("say").addEventListener("submit", say);
  await refreshSessions();
  setInterval(refreshSessions, 1000);
  setInterval(refreshTimeline, 2000);
  setInterval(refreshFiles, 5000);
}

start();
