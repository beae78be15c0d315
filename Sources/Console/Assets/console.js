// agentd console: a read-only view over agentd's public API (the same one agentctl uses).
//
// Rules this file keeps:
// - Everything from the server is data, and event content is hostile: it is only ever put
//   into the page with textContent (the el() helper), never parsed as HTML (ConsoleAuthTests
//   checks that no HTML-parsing API appears in this file). The page's CSP forbids inline
//   script as a second wall.
// - What the page holds is bounded: at most MAX_EVENTS events are rendered (the oldest go
//   first), long outputs are folded and cut at MAX_TEXT characters.
"use strict";

const MAX_EVENTS = 1000;        // events kept on a timeline
const INITIAL_BACKLOG = 500;    // events loaded before following (older ones: agentctl)
const MAX_TEXT = 64 * 1024;     // characters of one output or payload shown
const FOLD_LINES = 8;           // outputs longer than this are folded
const FOLD_CHARS = 600;
const MAX_SESSIONS = 500;       // sessions listed
const ACTIVITY_LOOKUPS = 200;   // sessions whose last event time is fetched

// --- helpers --------------------------------------------------------------------------------

/** An element with attributes and children; strings become text nodes (never HTML). */
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

/** Replaces `parent`'s children with `nodes`, leaving out the absent ones. */
function fill(parent, ...nodes) {
  parent.replaceChildren(...nodes.flat().filter(n => n !== undefined && n !== null && n !== false));
}

function show(...nodes) { fill(document.getElementById("view"), ...nodes); }

/** Text cut at MAX_TEXT characters, saying so. */
function bounded(text) {
  return text.length > MAX_TEXT ? text.slice(0, MAX_TEXT) + `\n… ${text.length - MAX_TEXT} more characters (agentctl session events shows all)` : text;
}

/** A value as text: strings as themselves, anything else as indented JSON. */
function asText(v) {
  if (v === undefined || v === null) return "";
  return typeof v === "string" ? v : JSON.stringify(v, null, 2);
}

function oneLine(text, n = 100) {
  const s = String(text ?? "").replace(/\n/g, "⏎");
  return s.length > n ? s.slice(0, n) + "…" : s;
}

/**
 * A <pre> of `text` in a <details>: open when `openIfShort` and the text is short, folded
 * otherwise (saying how long it is). Nothing for an empty text.
 */
function block(label, text, openIfShort) {
  if (!text) return null;
  text = bounded(text);
  const lines = text.split("\n").length;
  const long = lines > FOLD_LINES || text.length > FOLD_CHARS;
  const title = long ? `${label} (${lines} lines, ${text.length} characters)` : label;
  return el("details", { class: "fold", open: openIfShort && !long ? true : undefined }, el("summary", {}, title), el("pre", { text }));
}

class HTTPError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

/** GET a JSON document of the API; a 401 sends the browser to the login page. */
async function api(path, signal) {
  const res = await fetch(path, { headers: { accept: "application/json" }, credentials: "same-origin", signal });
  if (res.status === 401) { location.assign("/ui/login"); throw new HTTPError(401, "log in first"); }
  const body = await res.json().catch(() => null);
  if (!res.ok) throw new HTTPError(res.status, body?.error?.message || `${path}: HTTP ${res.status}`);
  return body;
}

function plural(n, noun) { return `${n} ${noun}${n === 1 ? "" : "s"}`; }

function failure(err) { return el("p", { class: "failure" }, String(err?.message || err)); }

const enc = encodeURIComponent;

// --- routing --------------------------------------------------------------------------------

let leave = null;   // stops the current page's live work (streams, timers)

function route() {
  if (leave) { leave(); leave = null; }
  health();
  const hash = location.hash || "#/sessions";
  const [path, query] = hash.slice(1).split("?");
  const params = new URLSearchParams(query || "");
  const parts = path.split("/").filter(Boolean);
  for (const a of document.querySelectorAll("[data-nav]")) {
    a.classList.toggle("active", a.dataset.nav === (parts[0] === "session" ? "sessions" : parts[0]));
  }
  const controller = new AbortController();
  const timers = [];
  leave = () => { controller.abort(); timers.forEach(clearInterval); };
  const ctx = { signal: controller.signal, every: (ms, f) => timers.push(setInterval(f, ms)) };
  switch (parts[0]) {
    case "session": return sessionPage(decodeURIComponent(parts.slice(1).join("/")), ctx);
    case "sandboxes": return sandboxesPage(ctx);
    case "policies": return policiesPage(ctx);
    default: return sessionsPage(params, ctx);
  }
}

async function health() {
  try {
    const h = await api("/v1/health");
    const n = h.policies?.errors?.length || 0;
    const errors = n ? `, ${plural(n, "policy error")}` : "";
    document.getElementById("health").textContent =
      `${h.status} · ${plural(h.sessions, "session")} · ${h.sandboxes.live} live / ${h.sandboxes.pooled} warm sandboxes${errors}`;
  } catch (e) {
    document.getElementById("health").textContent = `health: ${e.message}`;
  }
}

// --- sessions -------------------------------------------------------------------------------

function sessionState(s) {
  if (s.damage) return "damaged";
  if (s.deleted) return "deleted";
  return s.live_tasks.length ? "live" : "idle";
}

const WITHIN = { any: 0, "15m": 15 * 60e3, "1h": 3600e3, "24h": 86400e3, "7d": 7 * 86400e3 };

async function sessionsPage(params, ctx) {
  const filter = { policy: params.get("policy") || "", state: params.get("state") || "", within: params.get("within") || "any" };
  show(el("h1", {}, "Sessions"), el("p", { class: "muted" }, "Loading…"));
  let list;
  try { list = (await api("/v1/sessions", ctx.signal)).sessions; } catch (e) { return show(el("h1", {}, "Sessions"), failure(e)); }
  const total = list.length;
  list = list.slice(0, MAX_SESSIONS);
  const policies = [...new Set(list.map(s => s.policy))].sort();
  const setFilter = (k, v) => {
    const next = { ...filter, [k]: v };
    const q = new URLSearchParams(Object.entries(next).filter(([, v]) => v && v !== "any"));
    location.hash = "#/sessions" + (q.toString() ? "?" + q : "");
  };
  const select = (name, label, options, value) =>
    el("label", {}, label, el("select", { id: `filter-${name}`, onchange: e => setFilter(name, e.target.value) },
      options.map(([v, t]) => el("option", { value: v, selected: v === value ? true : undefined }, t))));
  const filters = el("div", { class: "filters" },
    select("policy", "Policy", [["", "any"], ...policies.map(p => [p, p])], filter.policy),
    select("state", "State", [["", "any"], ["live", "live (a task holds a sandbox)"], ["idle", "idle"], ["deleted", "deleted"], ["damaged", "damaged"]], filter.state),
    select("within", "Last activity", [["any", "any time"], ["15m", "last 15 minutes"], ["1h", "last hour"], ["24h", "last 24 hours"], ["7d", "last 7 days"]], filter.within));
  const rows = list.filter(s => (!filter.policy || s.policy === filter.policy) && (!filter.state || sessionState(s) === filter.state));
  const tbody = el("tbody");
  const activity = new Map();
  for (const s of rows) {
    const state = sessionState(s);
    const when = el("td", { class: "mono when" }, s.last_seq ? "…" : "—");
    activity.set(s.id, { row: null, cell: when, session: s });
    const tr = el("tr", { "data-session": s.id },
      el("td", {}, el("a", { href: `#/session/${enc(s.id)}`, class: "mono" }, s.id)),
      el("td", {}, s.policy),
      el("td", { class: "mono" }, String(s.last_seq)),
      el("td", { class: "mono" }, String(s.lease_epoch)),
      el("td", {}, s.live_tasks.join(", ") || "—"),
      el("td", {}, el("span", { class: `badge ${state}`, title: s.damage || "" }, state)),
      when);
    activity.get(s.id).row = tr;
    tbody.append(tr);
  }
  const note = total > MAX_SESSIONS ? el("p", { class: "notice" }, `Showing ${MAX_SESSIONS} of ${total} sessions; agentctl session list shows all.`) : null;
  show(el("h1", {}, "Sessions"), filters, note,
    rows.length ? el("table", { id: "sessions" },
      el("thead", {}, el("tr", {}, ["Session", "Policy", "Events", "Lease epoch", "Live tasks", "State", "Last event"].map(h => el("th", {}, h)))), tbody)
      : el("p", { class: "muted", id: "no-sessions" }, total ? "No session matches these filters." : "No sessions yet."));
  // The time of each session's last event (its last one only), a few at a time; the
  // "last activity" filter hides rows as their times arrive.
  const cutoff = WITHIN[filter.within] ? Date.now() - WITHIN[filter.within] : 0;
  const queue = [...activity.values()].filter(a => a.session.last_seq > 0).slice(0, ACTIVITY_LOOKUPS);
  const worker = async () => {
    while (queue.length && !ctx.signal.aborted) {
      const a = queue.shift();
      try {
        const events = (await api(`/v1/sessions/${enc(a.session.id)}/events?after=${a.session.last_seq - 1}`, ctx.signal)).events;
        const t = events.length ? events[events.length - 1].time : null;
        a.cell.textContent = t ? t.replace("T", " ").slice(0, 19) : "—";
        if (cutoff && t && Date.parse(t) < cutoff) a.row.hidden = true;
      } catch (e) { a.cell.textContent = "?"; }
    }
  };
  await Promise.all([worker(), worker(), worker(), worker()]);
  if (cutoff) for (const a of activity.values()) if (a.session.last_seq === 0) a.row.hidden = true;
}

// --- one session: verify and the live timeline ----------------------------------------------

function kind(type) {
  if (type.startsWith("tool.")) return "tool";
  if (type.startsWith("hands.")) return "hands";
  if (type.startsWith("task.")) return "task";
  if (type.startsWith("egress.")) return "egress";
  if (type === "agentd.lease") return "lease";
  if (type === "agentd.checkpoint") return "checkpoint";
  return "other";
}

/** The one-line summary and the folded details of an event (mirrors agentctl's timeline). */
function describe(ev) {
  const p = ev.payload && typeof ev.payload === "object" ? ev.payload : {};
  const s = k => asText(p[k]);
  const short12 = k => s(k).slice(0, 12);
  const details = [];
  let summary, isError = false;
  switch (ev.type) {
    case "session.created": summary = `policy ${s("policy")} (sha256 ${s("policy_sha256").slice(0, 12)})`; break;
    case "task.started": summary = `task ${s("task")} on ${s("driver")} Hands, policy ${s("policy")}`; break;
    case "task.ended": summary = `task ${s("task")} ended`; break;
    case "tool.intent": {
      const input = p.input || {};
      summary = `${s("task")}: ${s("tool")} ${oneLine(input.command ?? input.path ?? "", 120)}`;
      details.push(block("input", asText(input), true));
      break;
    }
    case "tool.result": {
      isError = p.is_error === true;
      summary = `${s("task")}: ${s("tool")} ${isError ? "ERROR" : "ok"} in ${s("duration_ms")} ms → ${oneLine(s("output"), 80)}`;
      details.push(block("output", s("output"), true));
      break;
    }
    case "tool.interrupted": summary = `${s("task")}: intent #${s("intent_seq")} interrupted (${s("reason")})`; isError = true; break;
    case "hands.provisioned": summary = `${s("task")}: sandbox ${short12("sandbox")} ready in ${s("milliseconds")} ms${p.from_pool ? " (warm pool)" : ""}`; break;
    case "hands.released": summary = `${s("task")}: sandbox ${short12("sandbox")} released (${s("reason")})`; break;
    case "hands.adopted": summary = `${s("task")}: sandbox ${short12("sandbox")} adopted`; break;
    case "hands.failed": summary = `${s("task")}: sandbox ${short12("sandbox")} failed: ${s("kind")} — ${oneLine(s("message"))}`; isError = true; break;
    case "egress.allowed":
    case "egress.denied": {
      const target = p.route !== undefined ? `route ${s("route")}${s("path")}` : s("host");
      const via = p.credential !== undefined ? ` with ${s("credential")}` : "";
      const bytes = ev.type === "egress.allowed" ? `, ${s("bytes_up")} B up, ${s("bytes_down")} B down` : "";
      summary = `${s("task")}: ${s("method")} ${oneLine(target, 60)}${via} → ${s("status")}${bytes}; ${oneLine(s("rule"), 80)}`;
      isError = ev.type === "egress.denied";
      break;
    }
    case "agentd.lease": summary = "wake: a Brain took the session over"; break;
    case "agentd.checkpoint": summary = "checkpoint stored"; break;
    case "session.deleted": summary = "session deleted"; break;
    default: summary = oneLine(asText(ev.payload), 120);
  }
  if (!["tool.intent", "tool.result"].includes(ev.type)) details.push(block("payload", asText(ev.payload), false));
  return { summary, details, isError };
}

function eventItem(ev, fresh) {
  const d = describe(ev);
  return el("li", {
    class: `ev k-${kind(ev.type)}${d.isError ? " error" : ""}${fresh ? " new" : ""}`,
    "data-seq": ev.seq, "data-type": ev.type,
  },
    el("div", { class: "ev-head" },
      el("span", { class: "ev-seq" }, `#${ev.seq}`),
      el("span", { class: "ev-time" }, String(ev.time).replace("T", " ").slice(0, 23)),
      el("span", { class: "ev-type" }, ev.type),
      ev.epoch ? el("span", { class: "badge" }, `epoch ${ev.epoch}`) : null,
      el("span", { class: "ev-summary" }, d.summary)),
    d.details);
}

function verifyBox(v) {
  if (v.intact) {
    return el("div", { id: "verify", class: "verify intact", "data-state": "intact" },
      el("strong", {}, "Chain intact"), ` — ${v.verified_records} records verified`,
      v.last_hash ? el("div", { class: "mono" }, `last hash ${v.last_hash}`) : null);
  }
  const b = v.first_broken || {};
  return el("div", { id: "verify", class: "verify broken", "data-state": "broken", "data-seq": b.seq },
    el("strong", {}, `Chain broken at seq ${b.seq}`),
    el("div", {}, `segment ${b.segment}, byte offset ${b.offset}: ${b.reason}`),
    el("div", { class: "muted" }, `${v.verified_records} records before it verified.`));
}

async function sessionPage(id, ctx) {
  const title = el("h1", {}, "Session ", el("span", { class: "mono" }, id));
  const meta = el("div", { class: "card", id: "session-meta" }, "Loading…");
  const verify = el("div", { id: "verify", class: "verify unknown", "data-state": "unknown" }, "Verifying the chain…");
  const status = el("div", { class: "stream", id: "stream" }, "connecting…");
  const dropped = el("p", { class: "notice", id: "dropped", hidden: true });
  const list = el("ol", { class: "timeline", id: "timeline" });
  show(el("p", {}, el("a", { href: "#/sessions" }, "← Sessions")), title, meta, verify,
    el("h2", {}, "Timeline"), status, dropped, list);

  let info;
  try {
    info = await api(`/v1/sessions/${enc(id)}`, ctx.signal);
    fill(meta,
      el("div", {}, "policy ", el("strong", {}, info.policy), ` · ${info.last_seq} events · lease epoch ${info.lease_epoch} · live tasks: ${info.live_tasks.join(", ") || "none"}`),
      info.deleted ? el("div", {}, el("span", { class: "badge deleted" }, "deleted")) : null,
      info.damage ? el("div", { class: "failure" }, `damaged: ${info.damage}`) : null);
  } catch (e) { meta.replaceChildren(failure(e)); }

  // Verified now, and again as the session grows (at most every 5 s).
  const refreshVerify = async () => {
    try {
      const v = await api(`/v1/sessions/${enc(id)}/verify`, ctx.signal);
      document.getElementById("verify")?.replaceWith(verifyBox(v));
    } catch (e) {
      if (!ctx.signal.aborted) document.getElementById("verify")?.replaceChildren(failure(e));
    }
  };
  await refreshVerify();
  let verifyDue = false;
  ctx.every(5000, () => { if (verifyDue) { verifyDue = false; refreshVerify(); } });

  let last = info ? Math.max(0, info.last_seq - INITIAL_BACKLOG) : 0;
  let skipped = last;
  const noteDropped = () => {
    if (!skipped) return;
    dropped.hidden = false;
    dropped.textContent = `${skipped} earlier events are not shown (the page keeps the last ${MAX_EVENTS}); agentctl session events ${id} lists them all.`;
  };
  noteDropped();
  let initial = true;
  const add = ev => {
    if (ev.seq <= last) return;  // a resumed stream repeats nothing, but be sure
    last = ev.seq;
    list.append(eventItem(ev, !initial));
    while (list.childElementCount > MAX_EVENTS) { list.firstElementChild.remove(); skipped++; }
    noteDropped();
    verifyDue = true;
  };
  // Follow: the server-sent event stream read with fetch (so that every event type arrives in
  // one place and a resume starts exactly after the last event shown).
  let backoff = 1000;
  while (!ctx.signal.aborted) {
    try {
      const res = await fetch(`/v1/sessions/${enc(id)}/events?follow=true&after=${last}`, {
        headers: { accept: "text/event-stream" }, credentials: "same-origin", signal: ctx.signal,
      });
      if (res.status === 401) { location.assign("/ui/login"); return; }
      if (!res.ok) {
        const body = await res.json().catch(() => null);
        throw new HTTPError(res.status, body?.error?.message || `events: HTTP ${res.status}`);
      }
      status.className = "stream live";
      status.textContent = "following live";
      backoff = 1000;
      await readSSE(res.body, (type, data) => {
        if (type === "gap" || type === "error") {
          status.className = "stream down";
          status.textContent = type === "gap" ? "the stream fell behind; resuming" : `stream error: ${JSON.parse(data).message}`;
          return;
        }
        const ev = JSON.parse(data);
        add(ev);
      }, () => { initial = false; });
      status.className = "stream down";
      status.textContent = "stream ended; reconnecting…";
    } catch (e) {
      if (ctx.signal.aborted) return;
      status.className = "stream down";
      status.textContent = `not following: ${e.message}; retrying…`;
      if (e.status === 404 || e.status === 500) { backoff = Math.max(backoff, 10000); }
    }
    await new Promise(r => setTimeout(r, backoff));
    backoff = Math.min(backoff * 2, 30000);
  }
}

/**
 * Reads a text/event-stream body, calling onEvent(type, data) per block; onIdle once the
 * stream has nothing more buffered (the backlog is shown, what comes next is new).
 */
async function readSSE(body, onEvent, onIdle) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const blockText = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let type = "message", data = [];
      for (const line of blockText.split("\n")) {
        if (line.startsWith(":")) continue;
        const i = line.indexOf(":");
        const field = i < 0 ? line : line.slice(0, i);
        const val = i < 0 ? "" : line.slice(i + 1).replace(/^ /, "");
        if (field === "event") type = val;
        else if (field === "data") data.push(val);
      }
      if (data.length) onEvent(type, data.join("\n"));
    }
    if (!buffer) setTimeout(onIdle, 300);
    if (buffer.length > 8 * 1024 * 1024) throw new Error("an event larger than 8 MiB");
  }
}

// --- sandboxes and pools --------------------------------------------------------------------

async function sandboxesPage(ctx) {
  const live = el("div", { id: "sandboxes" }, "Loading…");
  const pools = el("div", { id: "pools" }, "Loading…");
  show(el("h1", {}, "Sandboxes & warm pools"), el("h2", {}, "Serving tasks now"), live, el("h2", {}, "Warm pools"), pools,
    el("p", { class: "muted" }, "Refreshed every 5 seconds."));
  const refresh = async () => {
    try {
      const s = (await api("/v1/sandboxes", ctx.signal)).sandboxes;
      live.replaceChildren(s.length ? el("table", {},
        el("thead", {}, el("tr", {}, ["Session", "Task", "Sandbox", "Driver", "Image", "Running calls", "Idle"].map(h => el("th", {}, h)))),
        el("tbody", {}, s.map(x => el("tr", { "data-sandbox": x.id },
          el("td", {}, el("a", { href: `#/session/${enc(x.session)}`, class: "mono" }, x.session)),
          el("td", { class: "mono" }, x.task),
          el("td", { class: "mono", title: x.id }, x.id.slice(0, 24)),
          el("td", {}, x.driver), el("td", { class: "mono" }, x.image),
          el("td", { class: "mono" }, String(x.in_flight)),
          el("td", { class: "mono" }, `${Math.round(x.idle_s)} s`)))))
        : el("p", { class: "muted" }, "No sandbox serves a task now."));
    } catch (e) { live.replaceChildren(failure(e)); }
    try {
      const p = (await api("/v1/pools", ctx.signal)).pools;
      pools.replaceChildren(p.length ? el("table", {},
        el("thead", {}, el("tr", {}, ["Policy", "Target", "Ready", "Warming", "Last error"].map(h => el("th", {}, h)))),
        el("tbody", {}, p.map(x => el("tr", { "data-pool": x.policy },
          el("td", {}, x.policy), el("td", { class: "mono" }, String(x.target)), el("td", { class: "mono" }, String(x.ready)),
          el("td", {}, x.warming ? "yes" : "no"),
          el("td", {}, x.last_error ? el("span", { class: "badge bad" }, x.last_error) : "—")))))
        : el("p", { class: "muted" }, "No policy asks for a warm pool."));
    } catch (e) { pools.replaceChildren(failure(e)); }
  };
  await refresh();
  ctx.every(5000, refresh);
}

// --- policies -------------------------------------------------------------------------------

async function policiesPage(ctx) {
  let list;
  try { list = await api("/v1/policies", ctx.signal); } catch (e) { return show(el("h1", {}, "Policies"), failure(e)); }
  const errors = list.errors || [];
  show(el("h1", {}, "Policies"),
    el("p", { class: "muted" }, `Generation ${list.generation}. A reload with any error is refused as a whole: the last good set below stays in force until the errors are fixed.`),
    errors.length ? el("div", { class: "errors", id: "policy-errors" }, el("strong", {}, `${plural(errors.length, "error")} in the policy files`),
      el("ul", {}, errors.map(e => el("li", { class: "policy-error" }, e)))) : el("p", { id: "policy-errors-none" }, "No errors in the policy files."),
    el("h2", {}, "Loaded"),
    el("table", { id: "policies" },
      el("thead", {}, el("tr", {}, ["Name", "File", "Driver", "Command timeout", "Brain retries", "sha256"].map(h => el("th", {}, h)))),
      el("tbody", {}, (list.policies || []).map(p => el("tr", { "data-policy": p.name },
        el("td", {}, el("strong", {}, p.name)), el("td", { class: "mono" }, p.file), el("td", {}, p.driver),
        el("td", { class: "mono" }, p.command_timeout_s != null ? `${p.command_timeout_s} s` : "—"),
        el("td", { class: "mono" }, String(p.brain?.retries ?? "")),
        el("td", { class: "mono", title: p.sha256 }, String(p.sha256).slice(0, 16)))))));
}

// --- start ----------------------------------------------------------------------------------

window.addEventListener("hashchange", route);
route();
