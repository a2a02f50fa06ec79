// A public live scoreboard: plain EventSource against the broker's GET /sse, no library.
//
// The page opens `/sse?topic=scores/%23&latest=true`: the current score of every match,
// then each update as it comes. EventSource reconnects by itself after a dropped stream or
// a broker restart and sends `Last-Event-ID` (the last `<epoch>:<seq>` it saw): the broker
// resumes from there, so nothing is lost and nothing repeats. A reload starts a new
// EventSource, which has no Last-Event-ID: the page keeps the last id it saw in
// sessionStorage and resumes with `since` and `epoch` instead, showing what it showed.
//
// Options in the page's query: ?broker=http://127.0.0.1:8765&topic=scores/%23
"use strict";

const params = new URLSearchParams(location.search);
const BROKER = (params.get("broker") || "http://127.0.0.1:8765").replace(/\/+$/, "");
const TOPIC = params.get("topic") || "scores/#";
const KEY = "scoreboard:" + BROKER + ":" + TOPIC;
const MAX_FEED = 500; // updates kept in the feed (and across a reload)

const board = document.getElementById("board");
const feed = document.getElementById("feed");
const status = document.getElementById("status");

// What the page shows, kept across a reload: the last event id, the latest message per
// match, and the feed (each message once, by seq).
let saved = { lastId: null, matches: {}, feed: [] };
try {
  saved = JSON.parse(sessionStorage.getItem(KEY)) || saved;
} catch (e) {
  /* nothing kept */
}
const seen = new Set(saved.feed.map((m) => m.seq));

function save() {
  try {
    sessionStorage.setItem(KEY, JSON.stringify(saved));
  } catch (e) {
    /* storage full or off: a reload starts from the current scores */
  }
}

function setStatus(state, text) {
  status.setAttribute("data-state", state);
  status.textContent = text;
}

function score(data) {
  if (data && typeof data === "object" && "home" in data && "away" in data) {
    return `${data.home} – ${data.away}`;
  }
  return typeof data === "string" ? data : JSON.stringify(data);
}

function renderBoard() {
  const rows = Object.values(saved.matches)
    .sort((a, b) => a.topic.localeCompare(b.topic))
    .map((m) => {
      const tr = document.createElement("tr");
      tr.setAttribute("data-testid", "match");
      tr.setAttribute("data-topic", m.topic);
      const name = document.createElement("td");
      name.textContent = m.topic.replace(/^scores\//, "");
      const value = document.createElement("td");
      value.className = "score";
      value.setAttribute("data-testid", "score");
      value.textContent = score(m.data); // text, never HTML
      const when = document.createElement("td");
      when.textContent = new Date(m.ts).toLocaleTimeString();
      tr.append(name, value, when);
      return tr;
    });
  board.replaceChildren(...rows);
}

function feedItem(m) {
  const li = document.createElement("li");
  li.setAttribute("data-testid", "update");
  li.setAttribute("data-seq", String(m.seq));
  li.textContent = `${m.topic.replace(/^scores\//, "")}: ${score(m.data)}`;
  return li;
}

function show(m) {
  if (seen.has(m.seq)) return; // already shown (never expected: the broker repeats nothing)
  seen.add(m.seq);
  const known = saved.matches[m.topic];
  if (!known || known.seq < m.seq) saved.matches[m.topic] = m;
  saved.feed.push(m);
  feed.prepend(feedItem(m));
  if (saved.feed.length > MAX_FEED) {
    seen.delete(saved.feed.shift().seq);
    feed.lastElementChild.remove();
  }
  renderBoard();
}

// What was shown before a reload, then the stream from where it was.
for (const m of saved.feed) feed.prepend(feedItem(m));
renderBoard();

let url = `${BROKER}/sse?topic=${encodeURIComponent(TOPIC)}`;
const resume = saved.lastId && saved.lastId.match(/^(.*):(\d+)$/);
if (resume) {
  url += `&since=${resume[2]}&epoch=${encodeURIComponent(resume[1])}`;
} else {
  url += "&latest=true";
}
const source = new EventSource(url);

source.addEventListener("ready", (ev) => {
  const ready = JSON.parse(ev.data);
  if (!ready.recovered && resume) {
    // Another history (the broker's data was wiped): what it holds now is the truth.
    saved = { lastId: null, matches: {}, feed: [] };
    seen.clear();
    feed.replaceChildren();
    renderBoard();
  }
  if (ev.lastEventId) saved.lastId = ev.lastEventId;
  save();
  setStatus("live", "Live");
});

source.onmessage = (ev) => {
  const m = JSON.parse(ev.data);
  show(m);
  saved.lastId = ev.lastEventId;
  save();
};

source.onerror = () => {
  if (source.readyState === EventSource.CLOSED) {
    setStatus("failed", "The broker refused the stream; reload to try again.");
  } else {
    setStatus("reconnecting", "Reconnecting…");
  }
};

window.scoreboard = { source, shown: () => saved.feed.map((m) => m.seq) };
