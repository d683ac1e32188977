// The eventbus dashboard: four views over the admin listener's API (src/dashboard/ in the Rust
// crate). Every name shown comes from clients, so the page writes text nodes only, never HTML.
//
// - Event web: GET /api/v1/overview every POLL_MS; the graph is laid out by dagre and laid out
//   again only when its nodes or edges change; edge labels are rates from two polls' counts.
// - Topics & groups: the same document as tables.
// - Live tail: GET /api/v1/tail?pattern=P as server-sent events (EventSource).
// - Conversations: GET /api/v1/conversations and /api/v1/conversations/<id>.
import cytoscape from "cytoscape";
import dagre from "cytoscape-dagre";

cytoscape.use(dagre);

const POLL_MS = 2000;
/// Rows the tail keeps on screen; older rows are dropped.
const TAIL_ROWS = 500;

const $ = (selector) => document.querySelector(selector);

function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function banner(message) {
  const node = $("#banner");
  node.textContent = message ?? "";
  node.hidden = !message;
}

async function getJson(path) {
  const response = await fetch(path, { headers: { accept: "application/json" } });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    throw new Error(body.error ?? `${path}: HTTP ${response.status}`);
  }
  return body;
}

const number = new Intl.NumberFormat("en");
const fmt = (n) => number.format(n);
const rate = (r) => (r >= 10 ? r.toFixed(0) : r >= 0.05 ? r.toFixed(1) : "0");

function ago(ms, now) {
  if (ms == null) return "never";
  const s = Math.max(0, (now - ms) / 1000);
  if (s < 60) return `${s.toFixed(0)} s ago`;
  if (s < 3600) return `${(s / 60).toFixed(0)} min ago`;
  return `${(s / 3600).toFixed(1)} h ago`;
}

function clock(ms) {
  const d = new Date(ms);
  return d.toISOString().slice(11, 23);
}

// ---- views and navigation ----

function show(view) {
  const known = ["graph", "topics", "tail", "conversations"];
  if (!known.includes(view)) view = "graph";
  for (const section of document.querySelectorAll("main > section")) {
    section.hidden = section.dataset.view !== view;
  }
  for (const link of document.querySelectorAll("nav a")) {
    link.classList.toggle("active", link.dataset.view === view);
  }
  if (view === "graph" && graph.cy) {
    graph.cy.resize();
    graph.cy.fit(undefined, 30);
  }
  if (view === "conversations") loadRecent();
}

window.addEventListener("hashchange", () => show(location.hash.slice(1)));

// ---- overview: node line, graph, tables ----

const state = { overview: null, previous: null };

/// Events per second of a count between the previous overview and this one; null before there
/// are two polls (or for an entry new since the last).
function perSecond(key, count, now) {
  const before = state.previous?.counts.get(key);
  if (before == null || now <= state.previous.now) return null;
  return Math.max(0, count - before) / ((now - state.previous.now) / 1000);
}

const plural = (n, word) => `${fmt(n)} ${word}${n === 1 ? "" : "s"}`;

function uptime(seconds) {
  if (seconds < 60) return `${seconds} s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min`;
  const hours = Math.floor(seconds / 3600);
  return hours < 48 ? `${hours} h ${Math.floor((seconds % 3600) / 60)} min` : `${Math.floor(hours / 24)} days`;
}

function renderNode(node) {
  const parts = [
    `v${node.version}`,
    `${node.storage} log`,
    `head ${fmt(node.head_sequence)}`,
    plural(node.connections, "connection"),
    plural(node.subscriptions, "subscription"),
    `up ${uptime(node.uptime_seconds)}`,
  ];
  if (!node.event_data) parts.push("authentication on: event contents hidden");
  $("#node").textContent = parts.join(" · ");
}

const graph = { cy: null, shape: "" };

function edgeId(edge) {
  return `${edge.kind}|${edge.from}|${edge.to}|${edge.group}`;
}

function renderGraph(overview, counts) {
  const { nodes, edges } = overview.graph;
  const services = nodes.filter((n) => n.kind === "service").length;
  $("#graph-summary").textContent =
    `${services} services, ${nodes.length - services} topics, ${edges.length} edges` +
    (overview.graph.truncated ? " (truncated)" : "");
  const now = overview.node.now_ms;
  const elements = [
    ...nodes.map((n) => ({ group: "nodes", data: { id: n.id, label: n.name, kind: n.kind } })),
    ...edges.map((e) => {
      const id = edgeId(e);
      const flows = e.kind === "publishes" || e.kind === "replies";
      const perSec = perSecond(`edge:${id}`, e.events, now);
      const label = flows ? (perSec == null ? plural(e.events, "event") : `${rate(perSec)}/s`) : e.group ? `group ${e.group}` : "";
      counts.set(`edge:${id}`, e.events);
      return { group: "edges", data: { id, source: e.from, target: e.to, kind: e.kind, label } };
    }),
  ];
  const shape = elements.map((e) => e.data.id).sort().join("\n");
  if (!graph.cy) {
    const width = (node) => Math.max(60, node.data("label").length * 7 + 24);
    graph.cy = cytoscape({
      container: $("#graph"),
      maxZoom: 2,
      style: [
        { selector: "node", style: { label: "data(label)", "font-size": 11, "text-valign": "center", "text-halign": "center", color: "#fff", "text-wrap": "wrap", "text-max-width": 120 } },
        { selector: "node[kind = 'service']", style: { shape: "round-rectangle", width, height: 32, "background-color": "#2f6fb3" } },
        { selector: "node[kind = 'topic']", style: { shape: "ellipse", width, height: 28, "background-color": "#6b7785" } },
        { selector: "edge", style: { width: 1.5, "curve-style": "bezier", "target-arrow-shape": "triangle", label: "data(label)", "font-size": 10, "text-background-color": "#fff", "text-background-opacity": 0.9, "text-background-padding": 2 } },
        { selector: "edge[kind = 'publishes']", style: { "line-color": "#2f6fb3", "target-arrow-color": "#2f6fb3" } },
        { selector: "edge[kind = 'subscribes']", style: { "line-color": "#2e8b57", "target-arrow-color": "#2e8b57", "line-style": "dashed", color: "#2e8b57", "font-size": 9 } },
        { selector: "edge[kind = 'replies']", style: { "line-color": "#d9822b", "target-arrow-color": "#d9822b", "line-style": "dotted", width: 2 } },
        { selector: "edge[kind = 'matches']", style: { "line-color": "#a0a7ae", "target-arrow-color": "#a0a7ae", width: 1 } },
      ],
    });
  }
  if (shape !== graph.shape) {
    graph.shape = shape;
    graph.cy.elements().remove();
    graph.cy.add(elements);
    graph.cy.layout({ name: "dagre", rankDir: "LR", nodeSep: 24, rankSep: 110, edgeSep: 14, animate: false }).run();
    graph.cy.fit(undefined, 30);
    // A small graph is not blown up to fill the pane.
    if (graph.cy.zoom() > 1.3) {
      graph.cy.zoom(1.3);
      graph.cy.center();
    }
  } else {
    for (const e of elements) {
      if (e.group === "edges") graph.cy.getElementById(e.data.id).data("label", e.data.label);
    }
  }
}

function renderTables(overview, counts) {
  const now = overview.node.now_ms;
  const body = $("#topics tbody");
  body.replaceChildren(
    ...overview.topics.map((t) => {
      const r = perSecond(`topic:${t.name}`, t.events_published, now);
      counts.set(`topic:${t.name}`, t.events_published);
      return el(
        "tr",
        { "data-topic": t.name },
        el("td", { text: t.name }),
        el("td", { class: "n", text: r == null ? "…" : rate(r) }),
        el("td", { class: "n", text: fmt(t.events_published) }),
        el("td", { class: "n", text: fmt(t.events_held) }),
        el("td", { class: "n", text: fmt(t.subscribers) }),
        el("td", { text: t.groups.join(", ") }),
        el("td", { text: ago(t.last_publish_ms, now) }),
      );
    }),
  );
  $("#topics-note").textContent = overview.topics_truncated
    ? `The first ${overview.topics.length} topics by name; \`eventbus topics\` lists them all.`
    : "";
  $("#groups tbody").replaceChildren(
    ...overview.groups.map((g) =>
      el(
        "tr",
        { "data-group": g.name },
        el("td", { text: g.name }),
        el("td", { text: g.pattern }),
        el("td", { text: g.ack_mode + (g.parked ? " (parked)" : "") }),
        el("td", { class: "n", text: fmt(g.members) }),
        el("td", { class: "n", text: g.ack_mode === "manual" ? fmt(g.pending) : "" }),
        el("td", { class: "n", text: g.ack_mode === "manual" ? fmt(g.in_flight) : "" }),
        el("td", { class: g.redelivered ? "n bad" : "n", text: g.ack_mode === "manual" ? fmt(g.redelivered) : "" }),
        el("td", { class: g.dead_lettered ? "n bad" : "n", text: g.ack_mode === "manual" ? fmt(g.dead_lettered) : "" }),
      ),
    ),
  );
  const q = overview.queries;
  const counter = (label, value, bad = false) =>
    el("div", { class: bad && value > 0 ? "counter bad" : "counter" }, el("b", { text: fmt(value) }), label);
  $("#counters").replaceChildren(
    counter("queries answered", q.answered),
    counter("no responders", q.no_responders, true),
    counter("queries timed out", q.timeout, true),
    counter("slow consumers ended", overview.slow_consumers_ended, true),
    counter("events dead-lettered", overview.groups.reduce((sum, g) => sum + g.dead_lettered, 0), true),
  );
}

async function poll() {
  try {
    const overview = await getJson("/api/v1/overview");
    const counts = new Map();
    renderNode(overview.node);
    renderGraph(overview, counts);
    renderTables(overview, counts);
    state.previous = { now: overview.node.now_ms, counts };
    state.overview = overview;
    if (!overview.node.event_data) {
      const why = "event contents are shown only on a bus without authentication";
      $("#tail-start").disabled = true;
      $("#tail-status").textContent = why;
      for (const control of document.querySelectorAll("#conversation-form input, #conversation-form button")) control.disabled = true;
      $("#recent").replaceChildren(el("li", { class: "hint", text: why }));
    }
    state.unreachableSince = null;
    document.body.classList.remove("stale");
    banner(null);
  } catch (error) {
    // Keep what was shown, marked as old: the numbers are not live while the bus is away.
    state.unreachableSince ??= new Date();
    document.body.classList.add("stale");
    banner(`cannot read the bus since ${state.unreachableSince.toLocaleTimeString()} (${error.message}); what is shown is from before, retrying every ${POLL_MS / 1000} s`);
  }
  setTimeout(poll, POLL_MS);
}

// ---- live tail ----

const tail = { source: null, pattern: "", paused: false, held: [], dropped: 0, skipped: 0, last: null };

function tailRow(event) {
  const correlation = event.correlationid ?? "";
  const data = event.data !== undefined ? (typeof event.data === "string" ? event.data : JSON.stringify(event.data)) : event.data_base64 ? `base64: ${event.data_base64}` : "";
  return el(
    "tr",
    { "data-sequence": event.sequence },
    el("td", { class: "n", text: event.sequence }),
    el("td", { text: (event.publishtime ?? event.time ?? "").slice(11, 23) }),
    el("td", { text: event.subject ?? event.topic ?? "" }),
    el("td", { text: event.source }),
    el("td", { text: event.type }),
    el("td", {}, correlation ? el("a", { href: `#conversations`, text: correlation.slice(0, 13), title: correlation, onclick: () => openConversation(correlation) }) : ""),
    el("td", { class: "data", text: data.length > 300 ? `${data.slice(0, 300)}…` : data }),
  );
}

function tailAppend(rows) {
  const body = $("#tail tbody");
  body.prepend(...rows.reverse());
  while (body.rows.length > TAIL_ROWS) body.deleteRow(body.rows.length - 1);
}

function tailStatus(text) {
  $("#tail-status").textContent = text;
}

function startTail(pattern) {
  tail.source?.close();
  tail.paused = false;
  tail.held = [];
  tail.dropped = 0;
  tail.skipped = 0;
  tail.last = null;
  $("#tail-pause").textContent = "Pause";
  const source = new EventSource(`/api/v1/tail?pattern=${encodeURIComponent(pattern)}`);
  tail.source = source;
  tail.pattern = pattern;
  tailStatus(`connecting to ${pattern}…`);
  source.addEventListener("ready", (message) => {
    const ready = JSON.parse(message.data);
    if (ready.resumed_after != null) {
      tailStatus(`following ${ready.pattern}: reconnected, resumed after sequence ${fmt(ready.resumed_after)}`);
    } else if (tail.last != null) {
      // The bus's log was replaced (a restart of a memory store): sequences start again.
      tailStatus(`following ${ready.pattern}: reconnected to a new log at sequence ${fmt(ready.head_sequence)}; events after ${fmt(tail.last)} of the old one were not shown`);
    } else {
      tailStatus(`following ${ready.pattern} from sequence ${fmt(ready.head_sequence)}`);
    }
    $("#tail-pause").disabled = false;
  });
  source.addEventListener("event", (message) => {
    const event = JSON.parse(message.data);
    tail.last = Number(event.sequence);
    if (tail.paused) {
      tail.held.push(event);
      if (tail.held.length > TAIL_ROWS) {
        tail.held.shift();
        tail.dropped += 1;
      }
      tailStatus(`paused: ${fmt(tail.held.length)} events held` + (tail.dropped ? `, ${fmt(tail.dropped)} older ones dropped` : ""));
    } else {
      tailAppend([tailRow(event)]);
    }
  });
  source.addEventListener("skipped", (message) => {
    const skipped = JSON.parse(message.data);
    tail.skipped += skipped.events;
    tailStatus(`following ${tail.pattern}; ${fmt(tail.skipped)} events skipped so far (${skipped.why})`);
  });
  source.addEventListener("error", (message) => {
    if (message.data) {
      tailStatus(JSON.parse(message.data).error);
      source.close();
    } else if (source.readyState === EventSource.CLOSED) {
      tailStatus("the tail was refused (bad pattern, or too many tails open)");
    } else {
      tailStatus("lost the bus; reconnecting…");
    }
  });
}

async function checkPattern(pattern) {
  // EventSource hides an error answer's body: ask once with fetch for the message.
  const controller = new AbortController();
  try {
    const response = await fetch(`/api/v1/tail?pattern=${encodeURIComponent(pattern)}`, { signal: controller.signal });
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      return body.error ?? `HTTP ${response.status}`;
    }
    return null;
  } finally {
    controller.abort();
  }
}

$("#tail-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const pattern = $("#tail-pattern").value.trim() || ">";
  const problem = await checkPattern(pattern).catch((error) => error.message);
  if (problem) {
    tailStatus(problem);
    return;
  }
  startTail(pattern);
});

$("#tail-pause").addEventListener("click", () => {
  tail.paused = !tail.paused;
  $("#tail-pause").textContent = tail.paused ? "Resume" : "Pause";
  if (tail.paused) {
    tailStatus("paused: 0 events held");
  } else {
    tailAppend(tail.held.map(tailRow));
    const dropped = tail.dropped;
    tail.held = [];
    tail.dropped = 0;
    tailStatus(`following ${tail.pattern}` + (dropped ? `; ${fmt(dropped)} events arrived while paused and were dropped (${TAIL_ROWS} are held at most)` : ""));
  }
});

$("#tail-clear").addEventListener("click", () => $("#tail tbody").replaceChildren());

// ---- conversations ----

async function loadRecent() {
  try {
    const recent = await getJson("/api/v1/conversations?limit=30");
    $("#recent").replaceChildren(
      ...recent.map((c) =>
        el(
          "li",
          {},
          el("a", { href: "#conversations", text: c.correlation_id, onclick: () => openConversation(c.correlation_id) }),
          el("span", { class: "hint", text: `${c.events} events, ${c.queries} queries, ${(c.last_ms - c.first_ms).toFixed(1)} ms · ${c.topics.join(", ")}` }),
        ),
      ),
    );
    if (recent.length === 0) $("#recent").replaceChildren(el("li", { class: "hint", text: "no events with a correlation id in the newest part of the log" }));
  } catch (error) {
    $("#recent").replaceChildren(el("li", { class: "hint", text: error.message }));
  }
}

async function openConversation(id) {
  $("#conversation-id").value = id;
  const target = $("#conversation");
  target.replaceChildren(el("p", { class: "hint", text: `searching the log for ${id}…` }));
  let conversation;
  try {
    conversation = await getJson(`/api/v1/conversations/${encodeURIComponent(id)}`);
  } catch (error) {
    target.replaceChildren(el("p", { class: "hint", text: error.message }));
    return;
  }
  renderConversation(conversation);
}

function renderConversation(c) {
  const target = $("#conversation");
  if (c.events.length === 0) {
    const where = c.scanned ? ` among sequences ${fmt(c.scanned[0])}–${fmt(c.scanned[1])}` : "";
    target.replaceChildren(el("p", { class: "hint", text: `no event with correlation id ${c.correlation_id}${where}` }));
    return;
  }
  const start = c.events[0].publish_ms;
  const span = Math.max(c.span_ms, 0.001);
  const pct = (ms) => `${(((ms - start) / span) * 100).toFixed(2)}%`;
  const rows = c.exchanges.map((x, index) => {
    const answered = x.took_ms != null;
    const classes = ["exchange", index === c.slowest ? "slowest" : "", answered ? "" : "unanswered"].filter(Boolean).join(" ");
    const end = answered ? x.answered_ms : start + span;
    const label = `${x.topic} → ${x.responder ?? "no answer"}`;
    return el(
      "div",
      { class: classes, "data-topic": x.topic },
      el("div", { class: "label", title: `${x.asker} asked ${x.topic}` }, label, index === c.slowest ? el("span", { class: "badge", text: "slowest" }) : ""),
      el("div", { class: "track" }, el("div", { class: "span", style: `left:${pct(x.asked_ms)};width:calc(${pct(end)} - ${pct(x.asked_ms)})` })),
      el("div", { class: "took", text: answered ? `${x.took_ms.toFixed(2)} ms${x.error ? " (error)" : ""}` : "—" }),
    );
  });
  const events = el(
    "table",
    { id: "conversation-events" },
    el("thead", {}, el("tr", {}, ...["sequence", "+ms", "topic", "source", "type"].map((h) => el("th", { text: h })))),
    el(
      "tbody",
      {},
      ...c.events.map((e) =>
        el(
          "tr",
          {},
          el("td", { class: "n", text: e.sequence }),
          el("td", { class: "n", text: (e.publish_ms - start).toFixed(2) }),
          el("td", { text: e.topic }),
          el("td", { text: e.source }),
          el("td", { class: e.error ? "bad" : "", text: e.error ? `${e.type}: ${e.error}` : e.type }),
        ),
      ),
    ),
  );
  const slowest = c.slowest != null ? c.exchanges[c.slowest] : null;
  target.replaceChildren(
    el("h2", { text: `Conversation ${c.correlation_id}` }),
    el(
      "p",
      { class: "hint" },
      `${c.events.length} events over ${c.span_ms.toFixed(2)} ms; ${c.exchanges.length} queries` +
        (slowest ? `; the slowest answer: ${slowest.topic} by ${slowest.responder}, ${slowest.took_ms.toFixed(2)} ms` : "") +
        (c.truncated ? " (more events than shown)" : ""),
    ),
    el("div", { class: "timeline", id: "timeline" }, ...rows),
    el("h2", { text: "Events" }),
    events,
  );
}

$("#conversation-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const id = $("#conversation-id").value.trim();
  if (id) openConversation(id);
});
$("#conversations-refresh").addEventListener("click", loadRecent);

// For the browser tests and the curious: the graph and the last overview.
window.eventbusDashboard = { graph, state, openConversation };

show(location.hash.slice(1));
poll();
