// The kiosk page: follows /api/events (see events.schema.json) and draws the agent's
// state, the live conversation and the status strip; in manual turn mode it shows a
// push-to-talk button. No libraries, nothing loaded from the network.
"use strict";

const STATE_WORDS = {
  listening: "Listening", thinking: "Thinking…", speaking: "Speaking",
  initializing: "Starting…", offline: "Offline",
};
const MAX_BUBBLES = 40;
const token = new URLSearchParams(location.search).get("token");

// What the tests (and a curious operator) can read: window.__kiosk
const kiosk = { states: [], messages: 0, session: null, manual: false, ptt: false };
window.__kiosk = kiosk;

const $ = (id) => document.getElementById(id);
let interim = null; // the user's bubble while they are being transcribed
let spoken = null; // the agent's bubble while it is speaking

function showState(state) {
  const el = $("state");
  el.className = "state " + state;
  $("state-word").textContent = STATE_WORDS[state] || state;
  if (kiosk.states[kiosk.states.length - 1] !== state) kiosk.states.push(state);
}

function bubble(role, text, extraClass) {
  const el = document.createElement("div");
  el.className = "bubble " + role + (extraClass ? " " + extraClass : "");
  el.textContent = text;
  const box = $("conversation");
  box.appendChild(el);
  while (box.children.length > MAX_BUBBLES) box.removeChild(box.firstChild);
  box.scrollTop = box.scrollHeight;
  return el;
}

function showControls() {
  $("controls").hidden = !(kiosk.ptt && kiosk.manual);
}

function handle(msg) {
  kiosk.messages += 1;
  const d = msg.data || {};
  switch (msg.type) {
    case "snapshot": {
      // redraw from the recent messages, then take the sessions' current state
      $("conversation").textContent = "";
      interim = spoken = null;
      for (const m of d.recent || []) if (m.type !== "snapshot") handle(m);
      const models = (d.info && d.info.models) || {};
      $("status-models").textContent = "models: " +
        [models.stt, models.llm, models.tts].filter(Boolean).join(" · ");
      kiosk.ptt = Boolean(d.ptt);
      const current = (d.sessions || [])[d.sessions.length - 1];
      if (current) {
        kiosk.session = current.session;
        kiosk.manual = current.manual;
        showState(current.agent_state);
      } else {
        showState("offline");
      }
      showLatency(d.last_voice_to_voice_ms);
      $("status-calls").textContent = "calls: " + (d.calls_active || 0);
      showControls();
      break;
    }
    case "session_started":
      kiosk.session = msg.session;
      kiosk.manual = Boolean(d.manual);
      showState("initializing");
      showControls();
      break;
    case "session_ended":
      if (msg.session === kiosk.session) showState("offline");
      break;
    case "agent_state_changed":
      if (msg.session === kiosk.session) showState(d.new);
      break;
    case "user_input_transcribed":
      if (!interim) interim = bubble("user", "", "interim");
      interim.textContent = d.transcript;
      break;
    case "agent_transcript":
      if (d.segment_end) { spoken = null; break; }
      if (!spoken) spoken = bubble("assistant", "");
      spoken.textContent += d.text;
      $("conversation").scrollTop = $("conversation").scrollHeight;
      break;
    case "conversation_item_added":
      if (d.role === "user") {
        const el = interim || bubble("user", "");
        el.classList.remove("interim");
        el.textContent = d.text;
        interim = null;
      } else if (d.role === "assistant") {
        // the words already shown are what was spoken; the item is the final record
        const el = spoken || lastAssistant() || bubble("assistant", "");
        el.textContent = d.text;
        el.dataset.final = "1";
        if (d.interrupted) {
          const note = document.createElement("span");
          note.className = "note";
          note.textContent = "(interrupted)";
          el.appendChild(note);
        }
        spoken = null;
      }
      break;
    case "metrics":
      if (d.voice_to_voice_ms !== undefined) showLatency(d.voice_to_voice_ms);
      break;
    case "call_started":
    case "call_ended":
      $("status-calls").textContent = "calls: " + (d.calls_active || 0);
      break;
  }
}

function lastAssistant() {
  const all = $("conversation").querySelectorAll(".bubble.assistant");
  const last = all[all.length - 1];
  return last && !last.dataset.final ? last : null;
}

function showLatency(ms) {
  $("status-latency").textContent = "last reply: " + (ms == null ? "–" : Math.round(ms) + " ms");
}

let socket = null;
let retry = 500;

function connect() {
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  const url = proto + "//" + location.host + "/api/events" +
    (token ? "?token=" + encodeURIComponent(token) : "");
  socket = new WebSocket(url);
  socket.onopen = () => {
    retry = 500;
    $("status-link").textContent = "connected";
    $("status-link").className = "link up";
  };
  socket.onmessage = (ev) => {
    try { handle(JSON.parse(ev.data)); } catch (e) { console.error(e); }
  };
  socket.onclose = () => {
    $("status-link").textContent = "reconnecting…";
    $("status-link").className = "link down";
    showState("offline");
    setTimeout(connect, retry);
    retry = Math.min(retry * 2, 10000);
  };
}

// The on-screen push-to-talk: hold (mouse, finger or the space bar) to talk.
let held = false;
function ptt(action) {
  if ((action === "press") === held) return;
  held = action === "press";
  $("ptt").classList.toggle("held", held);
  $("ptt").textContent = held ? "Listening… release to send" : "Hold to talk";
  if (socket && socket.readyState === WebSocket.OPEN) {
    socket.send(JSON.stringify({ type: "ptt", action: action }));
  }
}
const button = $("ptt");
button.addEventListener("pointerdown", (e) => { button.setPointerCapture(e.pointerId); ptt("press"); });
for (const name of ["pointerup", "pointercancel", "lostpointercapture"]) {
  button.addEventListener(name, () => ptt("release"));
}
document.addEventListener("keydown", (e) => {
  if (e.code === "Space" && !e.repeat && !$("controls").hidden) { e.preventDefault(); ptt("press"); }
});
document.addEventListener("keyup", (e) => { if (e.code === "Space") ptt("release"); });

connect();
