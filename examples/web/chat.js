// A small chat page on broker.js: a group room with presence, and one-to-one messages
// through each user's inbox (user/<id>). Served by any static server; broker.js itself is
// imported from the broker (GET /broker.js), so the page and the broker can be on
// different origins. What the tab joined with (broker URL, room, token), the positions
// (broker.js's storage) and the messages shown are kept in sessionStorage: a reload shows
// the chat as it was and resumes it, each message once.

const MAX_KEPT = 500; // messages shown again after a reload

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
// The query wins, then what this tab joined with before a reload, then the defaults.
$("broker").value = params.get("broker") || sessionStorage.getItem("chat.broker") || $("broker").value;
$("room").value = params.get("room") || sessionStorage.getItem("chat.room") || $("room").value;
$("token").value = sessionStorage.getItem("chat.token") || "";

let client = null;
let me = null;
let room = null;
let kept = []; // the messages shown, as shown, for the next reload
const shown = new Set(); // "seq" or "seq:to": each message shown once

function keepShown() {
  try {
    sessionStorage.setItem("chat.messages", JSON.stringify(kept));
  } catch (e) {
    /* storage full or off: a reload shows only what comes next */
  }
}

function status(state, text) {
  $("status").dataset.state = state;
  $("status").textContent = text;
}

function show(msg, { direct = false, to = null } = {}, restoring = false) {
  const id = to ? `${msg.seq}:${to}` : String(msg.seq);
  if (shown.has(id)) return;
  shown.add(id);
  if (!restoring) {
    kept.push({ msg, direct, to });
    if (kept.length > MAX_KEPT) kept = kept.slice(-MAX_KEPT);
    keepShown();
  }
  const li = document.createElement("li");
  li.dataset.testid = "message";
  li.dataset.seq = String(msg.seq);
  li.dataset.direct = String(direct);
  li.dataset.own = String(!!me && msg.from.id === me.id);
  const who = document.createElement("span");
  who.className = "who";
  // Text only, never HTML: names and messages come from other people.
  who.textContent = to ? `${msg.from.name} → ${to}` : msg.from.name;
  const text = document.createElement("span");
  text.dataset.testid = "message-text";
  text.textContent = typeof msg.data === "string" ? msg.data : JSON.stringify(msg.data);
  li.append(who, text);
  $("messages").append(li);
  li.scrollIntoView({ block: "nearest" });
}

async function showPeople() {
  const users = await client.presence(room);
  const list = $("people");
  list.replaceChildren();
  for (const user of users) {
    const li = document.createElement("li");
    li.dataset.testid = "person";
    li.dataset.userId = user.id;
    li.textContent = `${user.name} (${user.id})`;
    list.append(li);
  }
}

async function join(ev) {
  ev?.preventDefault();
  const brokerUrl = $("broker").value.trim();
  const token = $("token").value.trim();
  room = $("room").value.trim();
  if (!token || !room) return;
  const httpBase = brokerUrl.replace(/^ws/, "http").replace(/\/ws$/, "");
  let BrokerClient;
  try {
    ({ BrokerClient } = await import(`${httpBase}/broker.js`));
  } catch (err) {
    status("failed", `Cannot load ${httpBase}/broker.js: is the broker running there?`);
    return;
  }
  sessionStorage.setItem("chat.token", token);
  sessionStorage.setItem("chat.broker", brokerUrl);
  sessionStorage.setItem("chat.room", room);

  client?.close();
  client = new BrokerClient(brokerUrl, { token, storage: sessionStorage, storageKey: "chat" });
  client.on("connecting", () => status("connecting", "Connecting…"));
  client.on("connected", ({ user }) => status("connected", `Connected as ${user.name}`));
  client.on("disconnected", (e) => {
    const why = e.error ? e.error.message : `closed (${e.code}${e.reason ? ": " + e.reason : ""})`;
    status(e.willReconnect ? "reconnecting" : "failed", e.willReconnect ? `Reconnecting… ${why}` : why);
  });
  client.on("gap", (gap) => status("connected", `Some messages in ${gap.pattern} could not be recovered`));

  const roomSub = client.subscribe(room, { last: 50, presence: true });
  roomSub.on("message", (msg) => show(msg));
  roomSub.on("join", showPeople);
  roomSub.on("leave", showPeople);
  await client.connect();
  me = client.user;
  const inbox = client.subscribe(`user/${me.id}`);
  inbox.on("message", (msg) => show(msg, { direct: true }));
  await roomSub.ready;
  $("room-name").textContent = room;
  $("join").hidden = true;
  $("chat").hidden = false;
  await showPeople();
}

async function send(ev) {
  ev.preventDefault();
  const to = $("to").value.trim();
  const text = $("text").value;
  const topic = to ? `user/${to}` : room;
  $("text").value = "";
  try {
    // echo: our own room messages come back like everyone else's, in seq order.
    const seq = await client.publish(topic, text, { echo: !to });
    if (to) {
      show({ seq, topic, data: text, from: me, ts: Date.now() }, { direct: true, to });
      $("to").value = ""; // the next message goes to the room again unless a user is named
    }
    $("send-result").textContent = `sent #${seq}`;
  } catch (err) {
    $("send-result").textContent = `not sent: ${err.message}`;
  }
}

$("join").addEventListener("submit", join);
$("send").addEventListener("submit", send);
// After a reload the page shows what it showed, rejoins by itself and resumes where it was.
if ($("token").value && sessionStorage.getItem("chat.subs")) {
  try {
    kept = JSON.parse(sessionStorage.getItem("chat.messages") || "[]");
  } catch (e) {
    kept = [];
  }
  for (const { msg, direct, to } of kept) show(msg, { direct, to }, true);
  join();
}
