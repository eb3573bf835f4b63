// The operator view: sessions and calls with their latency figures, and the event log.
"use strict";

const token = new URLSearchParams(location.search).get("token");
const sessions = new Map();
let calls = 0;
const $ = (id) => document.getElementById(id);

function ms(v) { return v == null ? "–" : Math.round(v) + " ms"; }

function median(values) {
  if (!values.length) return null;
  const s = [...values].sort((a, b) => a - b);
  const m = Math.floor(s.length / 2);
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}

function draw() {
  const body = $("sessions");
  body.textContent = "";
  for (const s of sessions.values()) {
    const row = document.createElement("tr");
    const room = s.room ? s.room.name + " (" + s.room.mode + ")" : "";
    const cells = [s.session, s.bridge, s.call || "", room, s.turns, s.agent_state,
      s.user_state, ms(s.last), ms(median(s.v2v))];
    cells.forEach((text, i) => {
      const td = document.createElement("td");
      td.textContent = text;
      if (i >= 7) td.className = "num";
      row.appendChild(td);
    });
    body.appendChild(row);
  }
  $("summary").textContent = sessions.size + " session(s), " + calls + " call(s) active";
}

function log(msg) {
  const line = new Date(msg.ts * 1000).toISOString().slice(11, 23) + " " +
    (msg.session || "-") + " " + msg.type + " " + JSON.stringify(msg.data);
  const el = $("log");
  el.textContent = (line + "\n" + el.textContent).slice(0, 20000);
}

function handle(msg) {
  const d = msg.data || {};
  if (msg.type === "snapshot") {
    sessions.clear();
    for (const s of d.sessions) {
      sessions.set(s.session, { ...s, last: s.last_voice_to_voice_ms,
        v2v: s.p50_voice_to_voice_ms == null ? [] : [s.p50_voice_to_voice_ms] });
    }
    calls = d.calls_active || 0;
  } else {
    log(msg);
    const s = sessions.get(msg.session);
    if (msg.type === "session_started") {
      sessions.set(msg.session, { session: msg.session, bridge: d.bridge, call: msg.call,
        room: null, turns: 0, agent_state: "initializing", user_state: "listening", last: null, v2v: [] });
    } else if (msg.type === "session_ended") {
      sessions.delete(msg.session);
    } else if (s && msg.type === "room") {
      s.room = { name: d.name, mode: d.mode };
    } else if (s && msg.type === "agent_state_changed") {
      s.agent_state = d.new;
    } else if (s && msg.type === "user_state_changed") {
      s.user_state = d.new;
    } else if (s && msg.type === "conversation_item_added" && d.role === "user") {
      s.turns += 1;
    } else if (s && msg.type === "metrics" && d.voice_to_voice_ms !== undefined) {
      s.last = d.voice_to_voice_ms;
      s.v2v.push(d.voice_to_voice_ms);
    } else if (msg.type === "call_started" || msg.type === "call_ended") {
      calls = d.calls_active || 0;
    }
  }
  draw();
}

function connect() {
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  const socket = new WebSocket(proto + "//" + location.host + "/api/events" +
    (token ? "?token=" + encodeURIComponent(token) : ""));
  socket.onopen = () => { $("link").textContent = "connected"; $("link").className = "link up"; };
  socket.onmessage = (ev) => handle(JSON.parse(ev.data));
  socket.onclose = () => {
    $("link").textContent = "reconnecting…";
    $("link").className = "link down";
    setTimeout(connect, 2000);
  };
}
connect();
