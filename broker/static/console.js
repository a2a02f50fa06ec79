/* broker console: plain JavaScript, no dependencies, no external requests.
 *
 * Speaks protocol version 1 (PROTOCOL.md) over one WebSocket at ws(s)://<host>/ws:
 * first frame {"op":"auth","token":...}, then sub/unsub/pub requests with ids.
 *
 * Resume: each subscription remembers the epoch from its `ok` and the highest seq known
 * for it (the `ok`'s seq, then every message matching it). After a reconnect it is sent
 * again with `since` and `epoch`; messages are deduplicated by seq, so a message is never
 * rendered twice. Everything that comes from the network is put in the page with
 * textContent, never as HTML.
 */
(function () {
  "use strict";

  var TOKEN_KEY = "broker.console.token";
  var SUBS_KEY = "broker.console.subs";
  var MAX_ROWS = 1000;          // rendered messages kept in the list
  var MAX_SEEN = 20000;         // seqs remembered for deduplication
  var BACKOFF_BASE_MS = 250;
  var BACKOFF_MAX_MS = 10000;
  var CLOSE_UNAUTHORIZED = 4001;
  var CLOSE_TOKEN_EXPIRED = 4003;

  function $(id) { return document.getElementById(id); }

  var el = {
    status: $("status"), statusText: $("status-text"), connDetail: $("conn-detail"),
    connForm: $("conn-form"), token: $("token"), connect: $("connect"),
    disconnect: $("disconnect"), retryNow: $("retry-now"),
    subForm: $("sub-form"), subTopic: $("sub-topic"), subLast: $("sub-last"),
    subResult: $("sub-result"), subs: $("subs"),
    pubForm: $("pub-form"), pubTopic: $("pub-topic"), pubData: $("pub-data"),
    pubJson: $("pub-json"), pubButton: $("pub-button"), pubResult: $("pub-result"),
    dmForm: $("dm-form"), dmTo: $("dm-to"), dmData: $("dm-data"),
    dmButton: $("dm-button"), dmResult: $("dm-result"), myInbox: $("my-inbox"),
    messages: $("messages"), empty: $("empty"), count: $("msg-count"), clear: $("clear")
  };

  // ---- state -------------------------------------------------------------------------

  var ws = null;            // current WebSocket, or null
  var wanted = false;       // the user asked to be connected
  var authed = false;       // hello received on the current socket
  var me = null;            // {id, name} from hello
  var attempt = 0;          // reconnect attempts since the last hello
  var retryTimer = null;
  var nextId = 1;
  var pending = {};         // request id -> {kind, ...}
  var subs = new Map();     // pattern -> {pattern, last, inbox, state, epoch, seq, error, li}
  var seen = new Set();     // seqs already rendered (or deliberately skipped)
  var seenOrder = [];       // insertion order of `seen`, to bound it
  var epoch = null;         // the broker history's epoch, from the latest sub ok
  var rendered = 0;

  // ---- small helpers -----------------------------------------------------------------

  function wsUrl() {
    if (location.protocol === "http:" || location.protocol === "https:") {
      return (location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/ws";
    }
    return "ws://127.0.0.1:8765/ws"; // opened from a file: the default local broker
  }

  function storageGet(key) {
    try { return window.sessionStorage.getItem(key); } catch (e) { return null; }
  }
  function storageSet(key, value) {
    try {
      if (value === null) window.sessionStorage.removeItem(key);
      else window.sessionStorage.setItem(key, value);
    } catch (e) { /* storage disabled: nothing to remember */ }
  }

  function pad(n, w) { n = String(n); while (n.length < (w || 2)) n = "0" + n; return n; }
  function clock(ms) {
    var d = new Date(ms);
    return pad(d.getHours()) + ":" + pad(d.getMinutes()) + ":" + pad(d.getSeconds());
  }

  function setResult(node, kind, text) {
    node.setAttribute("data-kind", kind);
    node.textContent = text;
  }

  function describeError(frame) {
    var code = typeof frame.code === "string" ? frame.code : "error";
    var msg = typeof frame.message === "string" && frame.message ? ": " + frame.message : "";
    return code + msg;
  }

  function validUserId(id) {
    return id.length > 0 && !/[\/+#]/.test(id);
  }

  // MQTT-style match, as PROTOCOL.md section 4.
  function matches(pattern, topic) {
    var p = pattern.split("/");
    var t = topic.split("/");
    if ((p[0] === "+" || p[0] === "#") && topic.charAt(0) === "$") return false;
    for (var i = 0; i < p.length; i++) {
      if (p[i] === "#") return true;
      if (i >= t.length) return false;
      if (p[i] !== "+" && p[i] !== t[i]) return false;
    }
    return p.length === t.length;
  }

  // ---- connection state display --------------------------------------------------------

  function showState(state, text, detail) {
    el.status.setAttribute("data-state", state);
    el.statusText.textContent = text;
    el.connDetail.textContent = detail || "";
    var live = state === "connected";
    var busy = state === "connecting" || state === "reconnecting" || live;
    el.disconnect.disabled = !busy;
    el.connect.textContent = busy ? "Reconnect" : "Connect";
    el.connect.classList.toggle("primary", !busy);
    el.retryNow.hidden = state !== "reconnecting";
    el.pubButton.disabled = !live;
    el.dmButton.disabled = !live;
  }

  // ---- connecting --------------------------------------------------------------------

  function connect() {
    var token = el.token.value.trim();
    if (!token) {
      el.token.setAttribute("aria-invalid", "true");
      showState("idle", "Not connected", "Paste a token first.");
      el.token.focus();
      return;
    }
    el.token.removeAttribute("aria-invalid");
    storageSet(TOKEN_KEY, token);
    wanted = true;
    attempt = 0;
    clearTimeout(retryTimer);
    retryTimer = null;
    dropSocket();
    open(false);
  }

  function disconnect() {
    wanted = false;
    clearTimeout(retryTimer);
    retryTimer = null;
    dropSocket();
    showState("idle", "Disconnected", "");
  }

  function dropSocket() {
    if (ws) {
      var old = ws;
      ws = null;
      old.onopen = old.onmessage = old.onerror = old.onclose = null;
      try { old.close(1000, "bye"); } catch (e) { /* already closed */ }
    }
    connectionLost();
  }

  function open(resuming) {
    var token = el.token.value.trim();
    showState(resuming ? "reconnecting" : "connecting",
              resuming ? "Reconnecting…" : "Connecting…",
              resuming ? "Attempt " + attempt + "." : "");
    var sock;
    try {
      sock = new WebSocket(wsUrl());
    } catch (e) {
      showState("refused", "Cannot connect", String(e && e.message || e));
      wanted = false;
      return;
    }
    ws = sock;
    var refusal = null; // the reason from an `error` unauthorized frame before the close

    sock.onopen = function () {
      send({ op: "auth", token: token });
    };

    sock.onmessage = function (ev) {
      if (sock !== ws) return;
      var frame;
      try { frame = JSON.parse(ev.data); } catch (e) { return; }
      if (!frame || typeof frame !== "object") return;
      if (frame.op === "error" && frame.code === "unauthorized" && frame.id === undefined) {
        refusal = typeof frame.message === "string" && frame.message ? frame.message : "unauthorized";
        return;
      }
      handle(frame);
    };

    sock.onclose = function (ev) {
      if (sock !== ws) return;
      ws = null;
      var wasAuthed = authed;
      connectionLost();
      if (ev.code === CLOSE_UNAUTHORIZED || ev.code === CLOSE_TOKEN_EXPIRED || refusal) {
        wanted = false;
        var reason = refusal || ev.reason ||
          (ev.code === CLOSE_TOKEN_EXPIRED ? "token expired" : "unauthorized");
        showState("refused", "Refused: " + reason,
                  "Close code " + ev.code + ". Check the token, then connect again.");
        return;
      }
      if (!wanted) return;
      scheduleReconnect(wasAuthed ? "Connection closed (code " + ev.code + (ev.reason ? ", " + ev.reason : "") + ")." :
                                    "Cannot reach the broker.");
    };
  }

  function scheduleReconnect(why) {
    attempt += 1;
    // Exponential backoff with jitter: a random delay in [d/2, d], d doubling up to the cap.
    var d = Math.min(BACKOFF_MAX_MS, BACKOFF_BASE_MS * Math.pow(2, attempt - 1));
    var delay = Math.round(d / 2 + Math.random() * d / 2);
    showState("reconnecting", "Reconnecting…",
              why + " Retrying in " + (delay / 1000).toFixed(1) + " s (attempt " + attempt + ").");
    clearTimeout(retryTimer);
    retryTimer = setTimeout(function () {
      retryTimer = null;
      if (wanted && !ws) open(true);
    }, delay);
  }

  function retryNow() {
    if (!wanted || ws) return;
    clearTimeout(retryTimer);
    retryTimer = null;
    open(true);
  }

  // Requests in flight die with their socket; subscriptions wait to be sent again.
  function connectionLost() {
    authed = false;
    Object.keys(pending).forEach(function (id) {
      var p = pending[id];
      if (p.kind === "pub" || p.kind === "dm") {
        setResult(p.result, "error", "Connection lost before the acknowledgement: the message may or may not have been published.");
      }
    });
    pending = {};
    subs.forEach(function (s) {
      if (s.state === "active" || s.state === "pending") setSubState(s, "pending");
    });
  }

  function send(frame) {
    if (!ws || ws.readyState !== 1) return false;
    ws.send(JSON.stringify(frame));
    return true;
  }

  function request(frame, info) {
    if (!authed) return false;
    var id = nextId++;
    frame.id = id;
    if (!send(frame)) return false;
    pending[id] = info;
    return true;
  }

  // ---- incoming frames ---------------------------------------------------------------

  function handle(frame) {
    switch (frame.op) {
      case "hello": return onHello(frame);
      case "msg": return onMsg(frame);
      case "ok":
      case "error": return onReply(frame);
      default: return; // join/leave and future ops: ignored
    }
  }

  function onHello(frame) {
    var user = frame.user || {};
    var id = String(user.id);
    var name = typeof user.name === "string" && user.name ? user.name : id;
    if (me && me.id !== id) {
      // Another user now: the previous user's inbox is not ours to follow.
      subs.forEach(function (s) { if (s.inbox) removeSub(s.pattern, true); });
    }
    me = { id: id, name: name };
    authed = true;
    attempt = 0;
    showState("connected", "Connected as " + name,
              "User id " + id + (frame.server ? " · " + frame.server : "") + " · " + wsUrl());
    el.status.setAttribute("data-user-id", id);
    el.myInbox.textContent = "user/" + id;
    var inbox = "user/" + id;
    if (!subs.has(inbox)) addSub(inbox, null, true);
    else subs.get(inbox).inbox = true;
    // (Re)subscribe everything: the inbox first, then the rest in the order they were added.
    var order = [subs.get(inbox)];
    subs.forEach(function (s) { if (s.pattern !== inbox) order.push(s); });
    order.forEach(function (s) { if (s.state !== "error") sendSub(s); });
  }

  function onReply(frame) {
    var p = pending[frame.id];
    if (frame.id === undefined || !p) {
      if (frame.op === "error") flashNotice("Error " + describeError(frame));
      return;
    }
    delete pending[frame.id];
    var ok = frame.op === "ok";
    if (p.kind === "sub") {
      var s = subs.get(p.pattern);
      if (!s || s.token !== p.token) return; // removed or replaced meanwhile
      if (!ok) {
        s.error = describeError(frame);
        setSubState(s, "error");
        if (p.announce) setResult(el.subResult, "error", "Cannot subscribe to " + p.pattern + ": " + s.error);
        return;
      }
      if (typeof frame.epoch === "string") {
        if (epoch !== null && frame.epoch !== epoch) historyStartedOver();
        epoch = frame.epoch;
        s.epoch = frame.epoch;
      }
      // A fresh subscription has everything after the ok's seq coming live. A resumed one
      // keeps its `since` until the replayed messages themselves move it on, so that a
      // replay cut short by another disconnect is asked for again.
      if (typeof frame.seq === "number" && p.since === undefined) {
        s.seq = s.seq === null ? frame.seq : Math.max(s.seq, frame.seq);
      }
      setSubState(s, "active");
      if (p.since !== undefined && frame.recovered === false) {
        flashNotice("Some messages on " + p.pattern + " are no longer in the broker's history and could not be recovered.");
      }
      if (p.announce) setResult(el.subResult, "ok", "Subscribed to " + p.pattern + ".");
    } else if (p.kind === "unsub") {
      // nothing to show: the row is already gone
    } else if (p.kind === "pub" || p.kind === "dm") {
      if (ok) {
        var seqText = typeof frame.seq === "number" ? " · seq " + frame.seq : "";
        setResult(p.result, "ok", (p.kind === "dm" ? "Sent to " : "Published to ") + p.topic + seqText);
        if (p.kind === "dm" && typeof frame.seq === "number") {
          // The recipient's inbox never comes back to us: show what we sent, once.
          render({ topic: p.topic, seq: frame.seq, data: p.data, from: me, ts: Date.now() }, true);
        }
      } else {
        setResult(p.result, "error", "Not published: " + describeError(frame));
      }
    }
  }

  function onMsg(frame) {
    if (typeof frame.seq !== "number" || typeof frame.topic !== "string") return;
    subs.forEach(function (s) {
      if (s.state !== "error" && matches(s.pattern, frame.topic) && (s.seq === null || frame.seq > s.seq)) {
        s.seq = frame.seq;
      }
    });
    render(frame, false);
  }

  // ---- the message list --------------------------------------------------------------

  function remember(seq) {
    seen.add(seq);
    seenOrder.push(seq);
    if (seenOrder.length > MAX_SEEN) seen.delete(seenOrder.shift());
  }

  function render(frame, outgoing) {
    if (seen.has(frame.seq)) return;
    remember(frame.seq);
    var from = frame.from && typeof frame.from === "object" ? frame.from : {};
    var fromId = from.id === undefined ? "" : String(from.id);
    var fromName = typeof from.name === "string" && from.name ? from.name : fromId || "?";
    var own = !!me && fromId === me.id;
    var ts = typeof frame.ts === "number" ? frame.ts : Date.now();

    var li = document.createElement("li");
    li.className = "msg" + (own ? " own" : "");
    li.setAttribute("data-testid", "message");
    li.setAttribute("data-seq", String(frame.seq));
    li.setAttribute("data-topic", frame.topic);
    li.setAttribute("data-from-id", fromId);
    li.setAttribute("data-own", own ? "true" : "false");
    if (outgoing) li.setAttribute("data-outgoing", "true");

    var meta = document.createElement("div");
    meta.className = "meta";

    var who = document.createElement("span");
    who.className = "from";
    who.setAttribute("data-testid", "msg-from");
    who.textContent = fromName;
    if (fromId) who.title = "user id " + fromId;
    meta.appendChild(who);

    if (me && frame.topic.slice(0, 5) === "user/" && !outgoing) {
      var dm = document.createElement("span");
      dm.className = "direct";
      dm.setAttribute("data-testid", "msg-direct");
      dm.textContent = "direct";
      meta.appendChild(dm);
    }

    if (own) {
      var you = document.createElement("span");
      you.className = "you";
      you.setAttribute("data-testid", "msg-own");
      you.textContent = outgoing ? "you → " + frame.topic.slice(5) : "you";
      meta.appendChild(you);
    }

    var topic = document.createElement("span");
    topic.className = "topic";
    topic.setAttribute("data-testid", "msg-topic");
    topic.textContent = frame.topic;
    meta.appendChild(topic);

    var time = document.createElement("time");
    time.className = "time";
    time.setAttribute("data-testid", "msg-time");
    time.dateTime = new Date(ts).toISOString();
    time.title = new Date(ts).toString();
    time.textContent = clock(ts);
    meta.appendChild(time);

    var seq = document.createElement("span");
    seq.className = "seq";
    seq.setAttribute("data-testid", "msg-seq");
    seq.textContent = "#" + frame.seq;
    meta.appendChild(seq);

    var data = document.createElement("p");
    data.className = "data";
    data.setAttribute("data-testid", "msg-data");
    if (typeof frame.data === "string") {
      data.textContent = frame.data;
    } else {
      data.className += " json";
      data.textContent = JSON.stringify(frame.data);
    }

    li.appendChild(meta);
    li.appendChild(data);
    insertBySeq(li, frame.seq);
  }

  function insertBySeq(li, seq) {
    var list = el.messages;
    var stick = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
    // Messages are kept in seq order; live ones almost always go at the end.
    var node = list.lastElementChild;
    while (node && node.hasAttribute("data-seq") && Number(node.getAttribute("data-seq")) > seq) {
      node = node.previousElementSibling;
    }
    list.insertBefore(li, node ? node.nextElementSibling : list.firstElementChild);
    rendered += 1;
    while (list.children.length > MAX_ROWS) list.removeChild(list.firstElementChild);
    updateCount();
    if (stick) list.scrollTop = list.scrollHeight;
  }

  function flashNotice(text) {
    var li = document.createElement("li");
    li.className = "msg notice";
    li.setAttribute("data-testid", "notice");
    var p = document.createElement("p");
    p.className = "data";
    p.textContent = text;
    li.appendChild(p);
    el.messages.appendChild(li);
    updateCount();
    el.messages.scrollTop = el.messages.scrollHeight;
  }

  function historyStartedOver() {
    // seqs restart with a new epoch: the old ones say nothing about the new history.
    seen = new Set();
    seenOrder = [];
    // Resume every subscription from the start of the new history (deduplicated anew).
    subs.forEach(function (s) { if (s.seq !== null) s.seq = 0; s.epoch = null; });
    flashNotice("The broker's history started over (new epoch); messages above are from before.");
  }

  function updateCount() {
    var n = el.messages.querySelectorAll('[data-testid="message"]').length;
    el.count.textContent = String(n);
    el.empty.hidden = el.messages.children.length > 0;
  }

  // ---- subscriptions -----------------------------------------------------------------

  function addSub(pattern, last, inbox) {
    var old = subs.get(pattern);
    var s = {
      pattern: pattern, last: last, inbox: !!inbox, state: "pending",
      epoch: old ? old.epoch : null, seq: old ? old.seq : null, error: null, li: null, token: 0
    };
    if (old && old.li) old.li.remove();
    subs.set(pattern, s);
    s.li = subRow(s);
    if (s.inbox) el.subs.insertBefore(s.li, el.subs.firstChild);
    else el.subs.appendChild(s.li);
    setSubState(s, "pending");
    saveSubs();
    return s;
  }

  function subRow(s) {
    var li = document.createElement("li");
    li.setAttribute("data-testid", "sub");
    li.setAttribute("data-pattern", s.pattern);
    var name = document.createElement("span");
    name.className = "pattern";
    name.textContent = s.pattern;
    li.appendChild(name);
    var badge = document.createElement("span");
    badge.className = "badge";
    badge.setAttribute("data-testid", "sub-state");
    li.appendChild(badge);
    if (s.inbox) {
      var tag = document.createElement("span");
      tag.className = "badge";
      tag.textContent = "inbox";
      li.appendChild(tag);
    } else {
      var rm = document.createElement("button");
      rm.type = "button";
      rm.textContent = "Remove";
      rm.setAttribute("data-testid", "sub-remove");
      rm.setAttribute("aria-label", "Remove subscription " + s.pattern);
      rm.addEventListener("click", function () {
        var next = li.nextElementSibling || li.previousElementSibling;
        removeSub(s.pattern, false);
        var focusTarget = next && next.querySelector("button");
        (focusTarget || el.subTopic).focus();
      });
      li.appendChild(rm);
    }
    var err = document.createElement("span");
    err.className = "sub-error";
    err.setAttribute("data-testid", "sub-error");
    err.hidden = true;
    li.appendChild(err);
    return li;
  }

  function setSubState(s, state) {
    s.state = state;
    if (!s.li) return;
    s.li.setAttribute("data-state", state);
    var badge = s.li.querySelector('[data-testid="sub-state"]');
    badge.textContent = state === "active" ? (s.last !== null && s.last !== undefined ? "live · last " + s.last : "live")
                      : state === "error" ? "refused" : "waiting";
    var err = s.li.querySelector('[data-testid="sub-error"]');
    err.hidden = state !== "error";
    err.textContent = state === "error" ? s.error || "" : "";
  }

  function sendSub(s) {
    s.token += 1;
    var frame = { op: "sub", topic: s.pattern };
    var info = { kind: "sub", pattern: s.pattern, token: s.token, announce: !!s.announce };
    s.announce = false;
    if (s.seq !== null && s.seq !== undefined) {
      frame.since = s.seq;
      info.since = s.seq;
      if (s.epoch) frame.epoch = s.epoch;
    } else if (typeof s.last === "number" && s.last > 0) {
      frame.last = s.last;
    }
    setSubState(s, "pending");
    request(frame, info);
  }

  function removeSub(pattern, silent) {
    var s = subs.get(pattern);
    if (!s) return;
    subs.delete(pattern);
    if (s.li) s.li.remove();
    if (authed) request({ op: "unsub", topic: pattern }, { kind: "unsub", pattern: pattern });
    if (!silent) setResult(el.subResult, "ok", "Unsubscribed from " + pattern + ".");
    saveSubs();
  }

  function saveSubs() {
    var list = [];
    subs.forEach(function (s) { if (!s.inbox) list.push({ pattern: s.pattern, last: s.last }); });
    storageSet(SUBS_KEY, JSON.stringify(list));
  }

  function restoreSubs() {
    var raw = storageGet(SUBS_KEY);
    if (!raw) return;
    try {
      JSON.parse(raw).forEach(function (x) {
        if (x && typeof x.pattern === "string" && x.pattern) {
          addSub(x.pattern, typeof x.last === "number" ? x.last : null, false);
        }
      });
    } catch (e) { storageSet(SUBS_KEY, null); }
  }

  function onSubSubmit(ev) {
    ev.preventDefault();
    var pattern = el.subTopic.value.trim();
    if (!pattern) {
      el.subTopic.setAttribute("aria-invalid", "true");
      setResult(el.subResult, "error", "Enter a topic or pattern.");
      el.subTopic.focus();
      return;
    }
    el.subTopic.removeAttribute("aria-invalid");
    var lastText = el.subLast.value.trim();
    var last = null;
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
    var existing = subs.get(pattern);
    if (existing && existing.inbox) {
      setResult(el.subResult, "ok", pattern + " is your inbox: already subscribed.");
      return;
    }
    var s = addSub(pattern, last, false);
    s.seq = null; // a fresh subscription: `last` (if any) decides the replay
    s.epoch = null;
    s.announce = true;
    if (authed) {
      sendSub(s);
      setResult(el.subResult, "pending", "Subscribing to " + pattern + "…");
    } else {
      setResult(el.subResult, "pending", "Will subscribe to " + pattern + " once connected.");
    }
    el.subTopic.value = "";
    el.subLast.value = "";
    el.subTopic.focus();
  }

  // ---- publishing --------------------------------------------------------------------

  function readData(textarea, asJson, result) {
    var text = textarea.value;
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

  function onPubSubmit(ev) {
    ev.preventDefault();
    var topic = el.pubTopic.value.trim();
    if (!topic) {
      el.pubTopic.setAttribute("aria-invalid", "true");
      setResult(el.pubResult, "error", "Enter a topic.");
      el.pubTopic.focus();
      return;
    }
    el.pubTopic.removeAttribute("aria-invalid");
    var got = readData(el.pubData, el.pubJson.checked, el.pubResult);
    if (!got.ok) return;
    el.pubData.removeAttribute("aria-invalid");
    var sent = request({ op: "pub", topic: topic, data: got.data, echo: true },
                       { kind: "pub", topic: topic, result: el.pubResult });
    if (!sent) {
      setResult(el.pubResult, "error", "Not connected.");
      return;
    }
    setResult(el.pubResult, "pending", "Publishing to " + topic + "…");
    el.pubData.value = "";
    el.pubData.focus();
  }

  function onDmSubmit(ev) {
    ev.preventDefault();
    var to = el.dmTo.value.trim();
    if (!validUserId(to)) {
      el.dmTo.setAttribute("aria-invalid", "true");
      setResult(el.dmResult, "error", "Enter a user id (no '/', '+' or '#').");
      el.dmTo.focus();
      return;
    }
    el.dmTo.removeAttribute("aria-invalid");
    var topic = "user/" + to;
    var text = el.dmData.value;
    var sent = request({ op: "pub", topic: topic, data: text, echo: true },
                       { kind: "dm", topic: topic, data: text, result: el.dmResult });
    if (!sent) {
      setResult(el.dmResult, "error", "Not connected.");
      return;
    }
    setResult(el.dmResult, "pending", "Sending to " + topic + "…");
    el.dmData.value = "";
    el.dmData.focus();
  }

  // Enter sends, Shift+Enter is a new line (IME composition left alone).
  function enterSends(textarea, form) {
    textarea.addEventListener("keydown", function (ev) {
      if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
        ev.preventDefault();
        if (typeof form.requestSubmit === "function") form.requestSubmit();
        else form.dispatchEvent(new Event("submit", { cancelable: true }));
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

  // ---- wiring ------------------------------------------------------------------------

  el.connForm.addEventListener("submit", function (ev) { ev.preventDefault(); connect(); });
  el.disconnect.addEventListener("click", disconnect);
  el.retryNow.addEventListener("click", retryNow);
  el.subForm.addEventListener("submit", onSubSubmit);
  el.pubForm.addEventListener("submit", onPubSubmit);
  el.dmForm.addEventListener("submit", onDmSubmit);
  el.pubJson.addEventListener("change", checkJson);
  el.pubData.addEventListener("input", checkJson);
  enterSends(el.pubData, el.pubForm);
  enterSends(el.dmData, el.dmForm);
  el.clear.addEventListener("click", function () {
    while (el.messages.firstChild) el.messages.removeChild(el.messages.firstChild);
    updateCount(); // `seen` is kept: cleared messages do not come back on a resume
  });
  window.addEventListener("online", function () { if (wanted && !ws) retryNow(); });

  var saved = storageGet(TOKEN_KEY);
  if (saved) el.token.value = saved;
  restoreSubs();
  showState("idle", "Not connected", "");
  updateCount();

  // A read-only view for debugging from the devtools console.
  window.brokerConsole = {
    state: function () { return el.status.getAttribute("data-state"); },
    user: function () { return me; },
    subscriptions: function () {
      var out = [];
      subs.forEach(function (s) { out.push({ pattern: s.pattern, state: s.state, seq: s.seq, epoch: s.epoch }); });
      return out;
    },
    url: wsUrl
  };
})();
