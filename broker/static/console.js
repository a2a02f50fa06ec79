/* broker console: the page at GET /. An ES module with no dependencies and no external
 * requests; everything about the protocol (authentication, resume by since/epoch,
 * de-duplication by seq, reconnecting, keyed publishes) is broker.js.
 *
 * What the page adds: forms, the message list, and memory across a reload. The token, the
 * wish to be connected, the subscriptions with their positions (broker.js's `storage`) and
 * the messages shown are kept in this tab's sessionStorage, so a reloaded page connects by
 * itself and resumes every subscription where it was: nothing lost, nothing shown twice.
 * Everything that comes from the network is put in the page with textContent, never as HTML.
 */
import { BrokerClient, ConnectionFailed } from "/broker.js";

const TOKEN_KEY = "broker.console.token";
const WANTED_KEY = "broker.console.connected";
const MESSAGES_KEY = "broker.console.messages"; // the index; each message under MESSAGES_KEY.<seq>
const STORAGE_KEY = "broker.console"; // broker.js keeps the subscriptions under it
const MAX_ROWS = 1000; // rendered messages kept in the list
const MAX_KEPT = 200; // messages kept across a reload
const MAX_KEPT_CHARS = 1 << 20; // and their JSON at most (sessionStorage holds ~5 M characters)
const MAX_SEEN = 20000; // seqs remembered so that a message is rendered once
// The broker's public patterns (readable without a token), written into the page by the
// broker: a visitor without a token watches them at once.
const PUBLIC = (document.querySelector('meta[name="broker-public"]')?.getAttribute("content") || "")
  .split(",")
  .map((p) => p.trim())
  .filter(Boolean);

const $ = (id) => document.getElementById(id);
const el = {
  status: $("status"), statusText: $("status-text"), connDetail: $("conn-detail"),
  connForm: $("conn-form"), token: $("token"), connect: $("connect"),
  disconnect: $("disconnect"), retryNow: $("retry-now"),
  subForm: $("sub-form"), subTopic: $("sub-topic"), subLast: $("sub-last"),
  subResult: $("sub-result"), subs: $("subs"),
  pubForm: $("pub-form"), pubTopic: $("pub-topic"), pubData: $("pub-data"),
  pubJson: $("pub-json"), pubButton: $("pub-button"), pubResult: $("pub-result"),
  dmForm: $("dm-form"), dmTo: $("dm-to"), dmData: $("dm-data"),
  dmButton: $("dm-button"), dmResult: $("dm-result"), myInbox: $("my-inbox"),
  messages: $("messages"), empty: $("empty"), count: $("msg-count"), clear: $("clear"),
};

// ---- state -------------------------------------------------------------------------------

let client = null; // the BrokerClient, or null when disconnected by choice
let anonymous = false; // connected without a token: public topics only
let dropped = 0; // messages no longer kept across a reload (the oldest went first)
let me = null; // {id, name} from the broker
const refused = new Map(); // pattern -> error text, for subscriptions the broker refused
const lastOf = new Map(); // pattern -> the "last N" it was made with (for its badge)
let seen = new Set(); // seqs rendered
let seenOrder = [];
let kept = []; // [{seq, size}] of the latest messages kept across a reload, oldest first
let keptChars = 0;

// ---- small helpers -----------------------------------------------------------------------

function storageGet(key) {
  try {
    return sessionStorage.getItem(key);
  } catch (e) {
    return null;
  }
}
function storageSet(key, value) {
  try {
    if (value === null) sessionStorage.removeItem(key);
    else sessionStorage.setItem(key, value);
    return true;
  } catch (e) {
    return false; // storage disabled or full: nothing to remember
  }
}
function tabStorage() {
  try {
    return window.sessionStorage;
  } catch (e) {
    return null;
  }
}

const pad = (n) => String(n).padStart(2, "0");
function clock(ms) {
  const d = new Date(ms);
  return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

function setResult(node, kind, text) {
  node.setAttribute("data-kind", kind);
  node.textContent = text;
}

function describe(err) {
  return err && err.code ? `${err.code}: ${err.message}` : String((err && err.message) || err);
}

const validUserId = (id) => id.length > 0 && !/[/+#]/.test(id);

// ---- connection state display ------------------------------------------------------------

function showState(state, text, detail) {
  el.status.setAttribute("data-state", state);
  el.statusText.textContent = text;
  el.connDetail.textContent = detail || "";
  const live = state === "connected";
  const busy = state === "connecting" || state === "reconnecting" || live;
  el.disconnect.disabled = !busy;
  el.connect.textContent = busy ? "Reconnect" : "Connect";
  el.connect.classList.toggle("primary", !busy);
  el.retryNow.hidden = state !== "reconnecting";
  el.pubButton.disabled = !live || anonymous;
  el.dmButton.disabled = !live || anonymous;
}

// ---- connecting --------------------------------------------------------------------------

function connect(token) {
  if (!token && !PUBLIC.length) {
    el.token.setAttribute("aria-invalid", "true");
    showState("idle", "Not connected", "Paste a token first.");
    el.token.focus();
    return;
  }
  el.token.removeAttribute("aria-invalid");
  storageSet(TOKEN_KEY, token || null);
  storageSet(WANTED_KEY, token ? "1" : null);
  dropClient();
  anonymous = !token;
  // Without a token: an anonymous connection to the public topics, with its own storage.
  const c = token
    ? new BrokerClient(undefined, { token, storage: tabStorage(), storageKey: STORAGE_KEY })
    : new BrokerClient(undefined, { anonymous: true, storage: tabStorage(), storageKey: STORAGE_KEY + ".public" });
  client = c;
  c.on("connecting", ({ attempt }) => {
    if (c !== client) return;
    if (attempt > 1 || c.reconnects > 0 || el.status.getAttribute("data-state") === "reconnecting") {
      showState("reconnecting", "Reconnecting…", `Attempt ${attempt}.`);
    } else {
      showState("connecting", "Connecting…", "");
    }
  });
  c.on("connected", ({ user, server, url }) => {
    if (c !== client) return;
    if (me && me.id !== user.id) forgetMessages();
    me = user;
    el.status.setAttribute("data-user-id", user.id);
    if (anonymous) {
      showState("connected", "Watching public topics", `No token: read-only · ${PUBLIC.join(", ")} · ${url}`);
      el.status.setAttribute("data-anonymous", "true");
      el.myInbox.textContent = "(none without a token)";
      // The current message of every public topic first, then what is live.
      for (const pattern of PUBLIC) watch(c.subscribe(pattern, { latest: true }), false);
      renderSubs();
      return;
    }
    el.status.removeAttribute("data-anonymous");
    showState("connected", `Connected as ${user.name}`, `User id ${user.id}${server ? " · " + server : ""} · ${url}`);
    el.myInbox.textContent = `user/${user.id}`;
    watch(c.subscribe(`user/${user.id}`), true);
    renderSubs();
  });
  c.on("disconnected", (e) => {
    if (c !== client) return;
    renderSubs();
    if (!e.willReconnect) {
      storageSet(WANTED_KEY, null);
      const reason = e.reason || (e.error && e.error.message) || "refused";
      showState("refused", `Refused: ${reason}`, `Close code ${e.code}. Check the token, then connect again.`);
      return;
    }
    const retry = ` Retrying in ${(e.delay / 1000).toFixed(1)} s.`;
    if (e.error instanceof ConnectionFailed && e.error.handshakeRefused) {
      showState("reconnecting", "Refused by the broker's origin check", e.error.message + "." + retry);
    } else if (e.error instanceof ConnectionFailed) {
      showState("reconnecting", "Reconnecting…", "Cannot reach the broker." + retry);
    } else {
      showState("reconnecting", "Reconnecting…", `Connection closed (code ${e.code}${e.reason ? ", " + e.reason : ""}).${retry}`);
    }
  });
  c.on("message", (msg) => render(msg, false));
  c.on("gap", (gap) => {
    if (gap.epochChanged) {
      seen = new Set();
      seenOrder = [];
      flashNotice("The broker's history started over (new epoch); messages above are from before.");
    } else {
      flashNotice(`Some messages on ${gap.pattern} are no longer in the broker's history and could not be recovered.`);
    }
  });
  c.on("error", (err) => flashNotice(`Error ${describe(err)}`));
  for (const sub of c.subscriptions.values()) watch(sub, false);
  renderSubs();
  c.connect().catch(() => {}); // a refusal is shown by the "disconnected" handler
}

function disconnect() {
  storageSet(WANTED_KEY, null);
  dropClient();
  showState("idle", "Disconnected", "");
}

function dropClient() {
  const c = client;
  client = null;
  if (c) c.close();
  renderSubs();
}

function retryNow() {
  if (client) client.connect().catch(() => {});
}

// ---- subscriptions -----------------------------------------------------------------------

function watch(sub, inbox) {
  if (sub._watched) return;
  sub._watched = true;
  sub.inbox = inbox;
  sub.on("subscribed", () => renderSubs());
  sub.on("error", (err) => {
    refused.set(sub.pattern, describe(err));
    renderSubs();
    if (sub.announce) setResult(el.subResult, "error", `Cannot subscribe to ${sub.pattern}: ${describe(err)}`);
  });
}

function subscribe(pattern, last) {
  refused.delete(pattern);
  const existing = client.subscriptions.get(pattern);
  if (existing && last !== null) {
    // A longer replay asked for: subscribe anew (the list keeps each message once).
    void existing.unsubscribe();
  }
  const sub = client.subscribe(pattern, last !== null ? { last } : {});
  if (last !== null) lastOf.set(pattern, last);
  watch(sub, false);
  sub.announce = true;
  sub.ready.then(
    () => setResult(el.subResult, "ok", `Subscribed to ${pattern}.`),
    () => {}
  );
  renderSubs();
  return sub;
}

function renderSubs() {
  const rows = [];
  const subs = client ? [...client.subscriptions.values()] : [];
  const inbox = me ? `user/${me.id}` : null;
  subs.sort((a, b) => (a.pattern === inbox ? -1 : b.pattern === inbox ? 1 : 0));
  for (const sub of subs) rows.push(subRow(sub.pattern, sub.state === "active" ? "active" : "pending", sub.pattern === inbox, sub));
  for (const [pattern, error] of refused) rows.push(subRow(pattern, "error", false, null, error));
  el.subs.replaceChildren(...rows);
}

function subRow(pattern, state, inbox, sub, error) {
  const li = document.createElement("li");
  li.setAttribute("data-testid", "sub");
  li.setAttribute("data-pattern", pattern);
  li.setAttribute("data-state", state);
  const name = document.createElement("span");
  name.className = "pattern";
  name.textContent = pattern;
  const badge = document.createElement("span");
  badge.className = "badge";
  badge.setAttribute("data-testid", "sub-state");
  const last = lastOf.get(pattern);
  badge.textContent = state === "active" ? (last ? `live · last ${last}` : "live") : state === "error" ? "refused" : "waiting";
  li.append(name, badge);
  if (inbox) {
    const tag = document.createElement("span");
    tag.className = "badge";
    tag.textContent = "inbox";
    li.append(tag);
  } else {
    const rm = document.createElement("button");
    rm.type = "button";
    rm.textContent = "Remove";
    rm.setAttribute("data-testid", "sub-remove");
    rm.setAttribute("aria-label", `Remove subscription ${pattern}`);
    rm.addEventListener("click", () => {
      const next = li.nextElementSibling || li.previousElementSibling;
      const nextPattern = next && next.getAttribute("data-pattern");
      refused.delete(pattern);
      lastOf.delete(pattern);
      if (sub) void sub.unsubscribe();
      renderSubs();
      setResult(el.subResult, "ok", `Unsubscribed from ${pattern}.`);
      const target = nextPattern && el.subs.querySelector(`[data-pattern="${CSS.escape(nextPattern)}"] button`);
      (target || el.subTopic).focus();
    });
    li.append(rm);
  }
  if (state === "error") {
    const err = document.createElement("span");
    err.className = "sub-error";
    err.setAttribute("data-testid", "sub-error");
    err.textContent = error || "";
    li.append(err);
  }
  return li;
}

// ---- the message list --------------------------------------------------------------------

function remember(seq) {
  seen.add(seq);
  seenOrder.push(seq);
  if (seenOrder.length > MAX_SEEN) seen.delete(seenOrder.shift());
}

// Each message is written once, under its own key, next to a small index of seqs: a message
// costs its own size, never the size of all the messages kept (64 KiB messages once cost
// 12 MiB of JSON each, rewriting the whole list).
function keptKey(seq) {
  return `${MESSAGES_KEY}.${seq}`;
}

function saveIndex() {
  storageSet(MESSAGES_KEY, JSON.stringify({ user: me ? me.id : null, seqs: kept.map((k) => k.seq), dropped }));
}

function dropOldest() {
  const oldest = kept.shift();
  keptChars -= oldest.size;
  storageSet(keptKey(oldest.seq), null);
}

function keep(msg, outgoing) {
  const text = JSON.stringify({ ...msg, outgoing });
  if (text.length > MAX_KEPT_CHARS) return; // shown, not kept
  while (kept.length && (kept.length >= MAX_KEPT || keptChars + text.length > MAX_KEPT_CHARS)) {
    dropOldest();
    dropped += 1;
  }
  if (storageSet(keptKey(msg.seq), text)) {
    kept.push({ seq: msg.seq, size: text.length });
    keptChars += text.length;
  }
  saveIndex();
}

function forgetKept() {
  while (kept.length) dropOldest();
  keptChars = 0;
  dropped = 0;
  storageSet(MESSAGES_KEY, null);
}

function forgetMessages() {
  forgetKept();
  seen = new Set();
  seenOrder = [];
  el.messages.replaceChildren();
  updateCount();
}

function render(msg, outgoing, restoring = false) {
  if (seen.has(msg.seq)) return;
  remember(msg.seq);
  if (!restoring) keep(msg, outgoing);
  const from = msg.from || { id: "", name: "" };
  const fromId = from.id === undefined ? "" : String(from.id);
  const fromName = from.name || fromId || "?";
  const own = !!me && fromId === me.id;
  const ts = typeof msg.ts === "number" && msg.ts ? msg.ts : Date.now();

  const li = document.createElement("li");
  li.className = "msg" + (own ? " own" : "");
  li.setAttribute("data-testid", "message");
  li.setAttribute("data-seq", String(msg.seq));
  li.setAttribute("data-topic", msg.topic);
  li.setAttribute("data-from-id", fromId);
  li.setAttribute("data-own", own ? "true" : "false");
  if (outgoing) li.setAttribute("data-outgoing", "true");

  const meta = document.createElement("div");
  meta.className = "meta";
  const who = document.createElement("span");
  who.className = "from";
  who.setAttribute("data-testid", "msg-from");
  who.textContent = fromName;
  if (fromId) who.title = `user id ${fromId}`;
  meta.append(who);
  if (msg.topic.startsWith("user/") && !outgoing) {
    const dm = document.createElement("span");
    dm.className = "direct";
    dm.setAttribute("data-testid", "msg-direct");
    dm.textContent = "direct";
    meta.append(dm);
  }
  if (own) {
    const you = document.createElement("span");
    you.className = "you";
    you.setAttribute("data-testid", "msg-own");
    you.textContent = outgoing ? `you → ${msg.topic.slice(5)}` : "you";
    meta.append(you);
  }
  const topic = document.createElement("span");
  topic.className = "topic";
  topic.setAttribute("data-testid", "msg-topic");
  topic.textContent = msg.topic;
  const time = document.createElement("time");
  time.className = "time";
  time.setAttribute("data-testid", "msg-time");
  time.dateTime = new Date(ts).toISOString();
  time.title = new Date(ts).toString();
  time.textContent = clock(ts);
  const seq = document.createElement("span");
  seq.className = "seq";
  seq.setAttribute("data-testid", "msg-seq");
  seq.textContent = `#${msg.seq}`;
  meta.append(topic, time, seq);

  const data = document.createElement("p");
  data.className = "data";
  data.setAttribute("data-testid", "msg-data");
  if (typeof msg.data === "string") {
    data.textContent = msg.data;
  } else {
    data.className += " json";
    data.textContent = JSON.stringify(msg.data);
  }
  li.append(meta, data);
  insertBySeq(li, msg.seq);
}

function insertBySeq(li, seq) {
  const list = el.messages;
  const stick = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
  // Messages are kept in seq order; live ones almost always go at the end.
  let node = list.lastElementChild;
  while (node && node.hasAttribute("data-seq") && Number(node.getAttribute("data-seq")) > seq) {
    node = node.previousElementSibling;
  }
  list.insertBefore(li, node ? node.nextElementSibling : list.firstElementChild);
  while (list.children.length > MAX_ROWS) list.removeChild(list.firstElementChild);
  updateCount();
  if (stick) list.scrollTop = list.scrollHeight;
}

function flashNotice(text) {
  const li = document.createElement("li");
  li.className = "msg notice";
  li.setAttribute("data-testid", "notice");
  const p = document.createElement("p");
  p.className = "data";
  p.textContent = text;
  li.append(p);
  el.messages.append(li);
  updateCount();
  el.messages.scrollTop = el.messages.scrollHeight;
}

function updateCount() {
  el.count.textContent = String(el.messages.querySelectorAll('[data-testid="message"]').length);
  el.empty.hidden = el.messages.children.length > 0;
}

function restoreMessages() {
  let saved = null;
  try {
    saved = JSON.parse(storageGet(MESSAGES_KEY) || "null");
  } catch (e) {
    saved = null;
  }
  if (!saved || !Array.isArray(saved.seqs)) return;
  me = saved.user ? { id: saved.user, name: "" } : null;
  dropped = typeof saved.dropped === "number" ? saved.dropped : 0;
  if (dropped > 0) {
    // Say so: the list after a reload is not everything this tab showed.
    flashNotice(`Showing the latest ${saved.seqs.length} messages kept across the reload; ${dropped} older ones are not kept.`);
  }
  for (const seq of saved.seqs) {
    const text = typeof seq === "number" ? storageGet(keptKey(seq)) : null;
    let msg = null;
    try {
      msg = JSON.parse(text || "null");
    } catch (e) {
      msg = null;
    }
    if (!msg || msg.seq !== seq || typeof msg.topic !== "string") continue;
    kept.push({ seq, size: text.length });
    keptChars += text.length;
    render(msg, !!msg.outgoing, true);
  }
}

// ---- forms -------------------------------------------------------------------------------

function onSubSubmit(ev) {
  ev.preventDefault();
  const pattern = el.subTopic.value.trim();
  if (!pattern) {
    el.subTopic.setAttribute("aria-invalid", "true");
    setResult(el.subResult, "error", "Enter a topic or pattern.");
    el.subTopic.focus();
    return;
  }
  el.subTopic.removeAttribute("aria-invalid");
  const lastText = el.subLast.value.trim();
  let last = null;
  if (lastText) {
    last = Number(lastText);
    if (!Number.isInteger(last) || last < 0) {
      el.subLast.setAttribute("aria-invalid", "true");
      setResult(el.subResult, "error", "“Last” must be a whole number, 0 or more.");
      el.subLast.focus();
      return;
    }
  }
  el.subLast.removeAttribute("aria-invalid");
  if (!client) {
    setResult(el.subResult, "error", "Connect first.");
    return;
  }
  if (me && pattern === `user/${me.id}`) {
    setResult(el.subResult, "ok", `${pattern} is your inbox: already subscribed.`);
    return;
  }
  subscribe(pattern, last);
  setResult(el.subResult, "pending", client.connected ? `Subscribing to ${pattern}…` : `Will subscribe to ${pattern} once connected.`);
  el.subTopic.value = "";
  el.subLast.value = "";
  el.subTopic.focus();
}

function readData(textarea, asJson, result) {
  const text = textarea.value;
  if (!asJson) return { ok: true, data: text };
  try {
    return { ok: true, data: JSON.parse(text) };
  } catch (e) {
    textarea.setAttribute("aria-invalid", "true");
    setResult(result, "error", "Not valid JSON: " + (e && e.message ? e.message : "parse error"));
    textarea.focus();
    return { ok: false };
  }
}

async function onPubSubmit(ev) {
  ev.preventDefault();
  const topic = el.pubTopic.value.trim();
  if (!topic) {
    el.pubTopic.setAttribute("aria-invalid", "true");
    setResult(el.pubResult, "error", "Enter a topic.");
    el.pubTopic.focus();
    return;
  }
  el.pubTopic.removeAttribute("aria-invalid");
  const got = readData(el.pubData, el.pubJson.checked, el.pubResult);
  if (!got.ok) return;
  el.pubData.removeAttribute("aria-invalid");
  if (!client || !client.connected) {
    setResult(el.pubResult, "error", "Not connected.");
    return;
  }
  setResult(el.pubResult, "pending", `Publishing to ${topic}…`);
  el.pubData.value = "";
  el.pubData.focus();
  try {
    const seq = await client.publish(topic, got.data, { echo: true });
    setResult(el.pubResult, "ok", `Published to ${topic} · seq ${seq}`);
  } catch (err) {
    setResult(el.pubResult, "error", `Not published: ${describe(err)}`);
  }
}

async function onDmSubmit(ev) {
  ev.preventDefault();
  const to = el.dmTo.value.trim();
  if (!validUserId(to)) {
    el.dmTo.setAttribute("aria-invalid", "true");
    setResult(el.dmResult, "error", "Enter a user id (no '/', '+' or '#').");
    el.dmTo.focus();
    return;
  }
  el.dmTo.removeAttribute("aria-invalid");
  if (!client || !client.connected) {
    setResult(el.dmResult, "error", "Not connected.");
    return;
  }
  const topic = `user/${to}`;
  const text = el.dmData.value;
  setResult(el.dmResult, "pending", `Sending to ${topic}…`);
  el.dmData.value = "";
  el.dmData.focus();
  try {
    const seq = await client.publish(topic, text, { echo: true });
    setResult(el.dmResult, "ok", `Sent to ${topic} · seq ${seq}`);
    // The recipient's inbox never comes back to us: show what we sent, once.
    render({ topic, seq, data: text, from: me, ts: Date.now() }, true);
  } catch (err) {
    setResult(el.dmResult, "error", `Not sent: ${describe(err)}`);
  }
}

// Enter sends, Shift+Enter is a new line (IME composition left alone).
function enterSends(textarea, form) {
  textarea.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
      ev.preventDefault();
      form.requestSubmit();
    }
  });
}

function checkJson() {
  if (!el.pubJson.checked || !el.pubData.value.trim()) {
    el.pubData.removeAttribute("aria-invalid");
    return;
  }
  try {
    JSON.parse(el.pubData.value);
    el.pubData.removeAttribute("aria-invalid");
  } catch (e) {
    el.pubData.setAttribute("aria-invalid", "true");
  }
}

// ---- wiring ------------------------------------------------------------------------------

el.connForm.addEventListener("submit", (ev) => {
  ev.preventDefault();
  connect(el.token.value.trim());
});
el.disconnect.addEventListener("click", disconnect);
el.retryNow.addEventListener("click", retryNow);
el.subForm.addEventListener("submit", onSubSubmit);
el.pubForm.addEventListener("submit", onPubSubmit);
el.dmForm.addEventListener("submit", onDmSubmit);
el.pubJson.addEventListener("change", checkJson);
el.pubData.addEventListener("input", checkJson);
enterSends(el.pubData, el.pubForm);
enterSends(el.dmData, el.dmForm);
el.clear.addEventListener("click", () => {
  el.messages.replaceChildren();
  forgetKept();
  updateCount(); // `seen` is kept: cleared messages do not come back on a resume
});
window.addEventListener("online", retryNow);

const savedToken = storageGet(TOKEN_KEY);
if (savedToken) el.token.value = savedToken;
showState("idle", "Not connected", "");
restoreMessages();
updateCount();
// A reload of a connected tab connects again by itself and resumes where it was; a visitor
// with no token watches the public topics at once, when the broker has any.
if (savedToken && storageGet(WANTED_KEY)) connect(savedToken);
else if (!savedToken && PUBLIC.length) connect(null);

// A read-only view for debugging from the devtools console.
window.brokerConsole = {
  state: () => el.status.getAttribute("data-state"),
  anonymous: () => anonymous,
  user: () => me,
  client: () => client,
  subscriptions: () =>
    client ? [...client.subscriptions.values()].map((s) => ({ pattern: s.pattern, state: s.state, ...s.position })) : [],
};
