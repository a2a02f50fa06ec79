/* broker.js: the broker's client library for browsers and Node. An ES module with no
 * dependencies and no build step; the broker serves it at /broker.js.
 *
 *   import { BrokerClient } from "/broker.js";
 *   const client = new BrokerClient("ws://127.0.0.1:8765/ws", { token });
 *   const sub = client.subscribe("chat/lobby", { last: 10 });
 *   sub.on("message", (m) => console.log(m.seq, m.from.name, m.data));
 *   await client.connect();
 *   const seq = await client.publish("chat/lobby", "hello");
 *
 * Speaks protocol version 1 (docs/protocol.md). What it does for the application:
 *
 * - Reconnects after any drop, a broker restart (1001) or a slow-consumer close (4008),
 *   trying its URLs in turn with exponential backoff and full jitter.
 * - Resumes every subscription with `since` (the last seq it delivered for it) and the
 *   `epoch` it was seen under, and delivers each seq once (deduplicated by seq). When the
 *   broker's history no longer holds what was missed it emits `gap`.
 * - With `getToken`, fetches a fresh token before `exp` and sends it as an `auth` frame on
 *   the open connection; a 4003 close gets a new token and resumes. A refused token (4001)
 *   stops it, with the reason.
 * - Every publish carries a `key` (generated unless given) and is sent again after a
 *   reconnect until its `ok` arrives: the broker records a keyed publish once.
 * - With `storage` (e.g. sessionStorage) the subscriptions and their positions survive a
 *   page reload: a reloaded page resumes exactly where it was.
 *
 * Checked by the TypeScript compiler (`// @ts-check`, strict, tests/js/tsconfig.broker.json);
 * broker.d.ts is generated from the JSDoc types here (`node tests/js/declarations.mjs`), so
 * the types below are the library's declared interface. Members whose name starts with `_`,
 * and those marked `@internal`, are left out of broker.d.ts.
 */
// @ts-check

/** WebSocket close codes of the protocol (docs/protocol.md, section 6). */
export const CloseCode = Object.freeze({
  NORMAL: 1000,
  GOING_AWAY: 1001,
  ABNORMAL: 1006,
  TOO_BIG: 1009,
  UNAUTHORIZED: 4001,
  TOKEN_EXPIRED: 4003,
  SLOW_CONSUMER: 4008,
});

// ---- errors ------------------------------------------------------------------------------

/** A request the broker refused, or a connection problem; `code` is the wire error code. */
export class BrokerError extends Error {
  /** The wire error code of this class (client-side codes for the client's own errors). */
  static code = "internal";

  /**
   * @param {string} [message]
   * @param {{ requestId?: number }} [options]
   */
  constructor(message, options = {}) {
    super(message || "broker error");
    this.name = new.target.name;
    /** The protocol error code ("bad_request", ...), or a client-side one ("connection_lost", ...). */
    this.code = new.target.code || "internal";
    /**
     * The id of the request this error answers, when there was one.
     * @type {number | undefined}
     */
    this.requestId = options.requestId;
  }
}

/** code "bad_request": malformed frame, bad field, invalid topic or pattern. */
export class BadRequest extends BrokerError {
  static code = "bad_request";
}
/** code "unauthorized": missing, invalid or refused token (close 4001). */
export class Unauthorized extends BrokerError {
  static code = "unauthorized";
}
/** An expired token: close 4003, or a token refused (4001) whose own `exp` has passed. */
export class TokenExpired extends Unauthorized {
  static code = "unauthorized";
}
/** code "forbidden": ACL, reserved topic, another user's inbox, stats without admin. */
export class Forbidden extends BrokerError {
  static code = "forbidden";
}
/** code "rate_limited": over the connection's publish rate. */
export class RateLimited extends BrokerError {
  static code = "rate_limited";
}
/** code "unavailable": the broker cannot take the request now (store down, shutting down). */
export class Unavailable extends BrokerError {
  static code = "unavailable";
}
/** code "internal": the broker failed. */
export class InternalError extends BrokerError {
  static code = "internal";
}
/** Client side: no connection could be made (`handshakeRefused` when HTTP answered but the WebSocket was refused). */
export class ConnectionFailed extends BrokerError {
  static code = "connection_failed";

  /**
   * @param {string} [message]
   * @param {{ requestId?: number, handshakeRefused?: boolean }} [options]
   */
  constructor(message, options = {}) {
    super(message, options);
    /** True when the broker answered plain HTTP but refused the WebSocket handshake (origin check, capacity). */
    this.handshakeRefused = !!options.handshakeRefused;
  }
}
/** Client side: the connection was lost or the client closed, and it will not come back. */
export class ConnectionLost extends BrokerError {
  static code = "connection_lost";
}
/** Client side: no answer within `requestTimeout`. */
export class RequestTimeout extends BrokerError {
  static code = "timeout";
}

/** @type {Record<string, typeof BrokerError>} */
const ERRORS_BY_CODE = {
  bad_request: BadRequest,
  unauthorized: Unauthorized,
  forbidden: Forbidden,
  rate_limited: RateLimited,
  unavailable: Unavailable,
  internal: InternalError,
};

/**
 * The error class instance for a wire error `code` (unknown codes give a plain BrokerError).
 * @param {string} code
 * @param {string} [message]
 * @param {number} [requestId]
 * @returns {BrokerError}
 */
export function errorForCode(code, message, requestId) {
  const Cls = ERRORS_BY_CODE[code] || BrokerError;
  const err = new Cls(message || String(code || "error").replace(/_/g, " "), { requestId });
  if (!ERRORS_BY_CODE[code] && typeof code === "string") err.code = code;
  return err;
}

// ---- small helpers -----------------------------------------------------------------------

/**
 * MQTT-style match of a topic against a pattern (docs/protocol.md, section 4).
 * @param {string} pattern
 * @param {string} topic
 * @returns {boolean}
 */
export function matches(pattern, topic) {
  const p = pattern.split("/");
  const t = topic.split("/");
  if ((p[0] === "+" || p[0] === "#") && topic.charAt(0) === "$") return false;
  for (let i = 0; i < p.length; i++) {
    if (p[i] === "#") return true;
    if (i >= t.length) return false;
    if (p[i] !== "+" && p[i] !== t[i]) return false;
  }
  return p.length === t.length;
}

/**
 * The claims of a JWT read without verifying it (null when unreadable).
 * @param {string} token
 * @returns {Record<string, unknown> | null}
 */
export function decodeToken(token) {
  try {
    const part = String(token).split(".")[1];
    const b64 = part.replace(/-/g, "+").replace(/_/g, "/");
    const bin = atob(b64 + "===".slice((b64.length + 3) % 4));
    const bytes = Uint8Array.from(bin, (c) => c.charCodeAt(0));
    const claims = JSON.parse(new TextDecoder().decode(bytes));
    return claims && typeof claims === "object" ? claims : null;
  } catch (e) {
    return null;
  }
}

/**
 * Stop a timer made by setTimeout; nothing when there is none.
 * @param {ReturnType<typeof setTimeout> | null} timer
 */
function stopTimer(timer) {
  if (timer !== null) clearTimeout(timer);
}

/**
 * What went wrong, in words, from whatever was thrown.
 * @param {unknown} err
 * @returns {string}
 */
function describe(err) {
  const text = err && typeof err === "object" && "message" in err ? err.message : null;
  return text ? String(text) : String(err);
}

/**
 * The token's `exp` in ms since the epoch (null without one).
 * @param {string | null} token
 */
function tokenExpiry(token) {
  const claims = token ? decodeToken(token) : null;
  return claims && typeof claims.exp === "number" ? claims.exp * 1000 : null;
}

function newKey() {
  const c = globalThis.crypto;
  if (c && typeof c.randomUUID === "function") return c.randomUUID();
  const bytes = new Uint8Array(16);
  if (c && typeof c.getRandomValues === "function") c.getRandomValues(bytes);
  else for (let i = 0; i < 16; i++) bytes[i] = Math.floor(Math.random() * 256);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function defaultUrl() {
  const loc = globalThis.location;
  if (loc && (loc.protocol === "http:" || loc.protocol === "https:")) {
    return (loc.protocol === "https:" ? "wss://" : "ws://") + loc.host + "/ws";
  }
  return "ws://127.0.0.1:8765/ws";
}

/** @param {string} url */
function absoluteUrl(url) {
  const loc = globalThis.location;
  if (/^wss?:\/\//i.test(url)) return url;
  if (loc && loc.href && /^https?:/.test(loc.protocol)) {
    const u = new URL(url, loc.href);
    u.protocol = u.protocol === "https:" ? "wss:" : "ws:";
    return u.href;
  }
  throw new TypeError(`invalid broker URL ${JSON.stringify(url)}: expected ws:// or wss://`);
}

/** @param {string} wsUrl */
function healthzUrl(wsUrl) {
  const u = new URL(wsUrl);
  u.protocol = u.protocol === "wss:" ? "https:" : "http:";
  u.pathname = "/healthz";
  u.search = "";
  return u.href;
}

/**
 * @param {Frame} frame a `msg` frame
 * @returns {Message}
 */
function message(frame) {
  const from = frame.from && typeof frame.from === "object" ? frame.from : {};
  const id = from.id === undefined ? "" : String(from.id);
  return {
    topic: frame.topic,
    seq: frame.seq,
    data: frame.data,
    from: { id, name: typeof from.name === "string" ? from.name : id },
    ts: typeof frame.ts === "number" ? frame.ts : 0,
  };
}

/**
 * A minimal event emitter: `on` returns a function that removes the listener.
 * @template Events the event names and what each passes to its listeners
 */
export class Emitter {
  constructor() {
    /** @type {Map<keyof Events, Set<(arg: any) => void>>} */
    this._listeners = new Map();
  }

  /**
   * Call `listener` on each `event`; returns a function that stops it.
   * @template {keyof Events} K
   * @param {K} event
   * @param {(arg: Events[K]) => void} listener
   * @returns {() => void}
   */
  on(event, listener) {
    let set = this._listeners.get(event);
    if (!set) this._listeners.set(event, (set = new Set()));
    set.add(listener);
    return () => this.off(event, listener);
  }

  /**
   * Call `listener` on the next `event` only.
   * @template {keyof Events} K
   * @param {K} event
   * @param {(arg: Events[K]) => void} listener
   * @returns {() => void}
   */
  once(event, listener) {
    const off = this.on(event, (arg) => {
      off();
      listener(arg);
    });
    return off;
  }

  /**
   * Remove a listener added with `on`.
   * @template {keyof Events} K
   * @param {K} event
   * @param {(arg: Events[K]) => void} listener
   */
  off(event, listener) {
    const set = this._listeners.get(event);
    if (set) set.delete(listener);
  }

  /**
   * The number of listeners of `event`.
   * @param {keyof Events} event
   * @returns {number}
   */
  listenerCount(event) {
    const set = this._listeners.get(event);
    return set ? set.size : 0;
  }

  /**
   * Call the listeners of `event` with `arg`; false when there are none.
   * @internal
   * @template {keyof Events} K
   * @param {K} event
   * @param {Events[K]} arg
   * @returns {boolean}
   */
  emit(event, arg) {
    const set = this._listeners.get(event);
    if (!set || set.size === 0) return false;
    for (const listener of [...set]) {
      try {
        listener(arg);
      } catch (err) {
        // A listener's bug must not break the connection or the other listeners.
        console.error(`broker.js: a "${String(event)}" listener threw`, err);
      }
    }
    return true;
  }
}

// ---- subscriptions -----------------------------------------------------------------------

/**
 * One subscription to a topic or pattern. Events: "message" (a message), "subscribed"
 * ({seq, epoch, recovered, resumed}), "gap" (a resume could not recover everything),
 * "join"/"leave" ({topic, user}, with presence), "error" (the broker refused it; it ends).
 * Iterate it with `for await (const msg of sub)`.
 * @extends {Emitter<SubscriptionEvents>}
 * @implements {AsyncIterable<Message>}
 */
export class Subscription extends Emitter {
  /**
   * Made by `BrokerClient.subscribe`.
   * @internal
   * @param {BrokerClient} client
   * @param {string} pattern
   * @param {{ presence?: boolean, since?: number | null, epoch?: string | null, last?: number | null, latest?: boolean, confirmed?: boolean, restored?: boolean }} options
   */
  constructor(client, pattern, options) {
    super();
    /** @readonly */
    this.client = client;
    /**
     * The topic or pattern.
     * @readonly
     */
    this.pattern = pattern;
    /** True when join/leave events are asked for. */
    this.presence = !!options.presence;
    // Resume point: the highest seq delivered (or known covered) for this pattern.
    /** @internal @type {number | null} */
    this.since = options.since ?? null;
    /** @internal @type {string | null} */
    this.epoch = options.epoch ?? null;
    /** @internal @type {number | null} */
    this.last = options.last ?? null;
    /** @internal */
    this.latest = !!options.latest; // a latest replay not done yet: asked again on resume
    /** @internal @type {number | null} */
    this.replayUntil = null; // the `ok` seq while its replay may still be arriving
    /** @internal */
    this.confirmed = !!options.confirmed; // resume it on every new connection
    /** @internal */
    this.active = false; // confirmed on the current connection
    /** True once unsubscribed, refused, or the client closed or failed. */
    this.ended = false;
    /** @internal */
    this.restored = !!options.restored;
    /** @type {Message[]} */
    this._backlog = []; // messages that arrived before any consumer was attached
    /** @type {Set<{ queue: Message[], wake: (() => void) | null }>} */
    this._iterators = new Set();
    /** @type {BrokerError | null} */
    this._failure = null;
    /** @type {(info: Subscribed) => void} */
    this._resolveReady = () => {};
    /** @type {(error: BrokerError) => void} */
    this._rejectReady = () => {};
    /**
     * The first answer of the broker; rejects when it refuses the subscription.
     * @readonly
     * @type {Promise<Subscribed>}
     */
    this.ready = new Promise((resolve, reject) => {
      this._resolveReady = resolve;
      this._rejectReady = reject;
    });
    this.ready.catch(() => {}); // awaited by callers that care; never an unhandled rejection
  }

  /**
   * "pending" (waiting for the broker's answer, or for a connection), "active" or "ended".
   * @returns {"pending" | "active" | "ended"}
   */
  get state() {
    return this.ended ? "ended" : this.active ? "active" : "pending";
  }

  /**
   * Where a resume starts: `{since, epoch}` (since null before anything is known).
   * @returns {{ since: number | null, epoch: string | null }}
   */
  get position() {
    return { since: this.since, epoch: this.epoch };
  }

  /**
   * Call `listener` on each `event`; returns a function that stops it. A "message" listener
   * first gets the messages that arrived before anyone listened.
   * @template {keyof SubscriptionEvents} K
   * @param {K} event
   * @param {(arg: SubscriptionEvents[K]) => void} listener
   * @returns {() => void}
   */
  on(event, listener) {
    const off = super.on(event, listener);
    if (event === "message" && this._backlog.length) this._flushBacklog();
    return off;
  }

  /** Stop the subscription (the broker is told when connected); iterators end. */
  async unsubscribe() {
    if (this.ended) return;
    this._end(null);
    await this.client._unsubscribe(this);
  }

  /** @returns {AsyncIterableIterator<Message>} */
  [Symbol.asyncIterator]() {
    const queue = this._backlog.splice(0);
    /** @type {{ queue: Message[], wake: (() => void) | null }} */
    const it = { queue, wake: null };
    this._iterators.add(it);
    const sub = this;
    return {
      next() {
        const queued = it.queue.shift();
        if (queued !== undefined) return Promise.resolve({ value: queued, done: false });
        if (sub.ended || !sub._iterators.has(it)) {
          return sub._failure ? Promise.reject(sub._failure) : Promise.resolve({ value: undefined, done: true });
        }
        return new Promise((resolve, reject) => {
          it.wake = () => {
            it.wake = null;
            const msg = it.queue.shift();
            if (msg !== undefined) resolve({ value: msg, done: false });
            else if (sub._failure) reject(sub._failure);
            else resolve({ value: undefined, done: true });
          };
        });
      },
      return() {
        sub._iterators.delete(it);
        if (it.wake) it.wake();
        return Promise.resolve({ value: undefined, done: true });
      },
      [Symbol.asyncIterator]() {
        return this;
      },
    };
  }

  /** @param {Message} msg */
  _deliver(msg) {
    const listened = this.emit("message", msg);
    for (const it of this._iterators) {
      it.queue.push(msg);
      if (it.wake) it.wake();
    }
    if (!listened && this._iterators.size === 0 && this.client.listenerCount("message") === 0) {
      this._backlog.push(msg);
      const max = this.client.options.maxBuffered;
      if (this._backlog.length > max) this._backlog.splice(0, this._backlog.length - max);
    }
  }

  _flushBacklog() {
    queueMicrotask(() => {
      const backlog = this._backlog.splice(0);
      for (const msg of backlog) this._deliver(msg);
    });
  }

  /** @param {BrokerError | null} error */
  _end(error) {
    if (this.ended) return;
    this.ended = true;
    this.active = false;
    this._failure = error;
    if (error) this._rejectReady(error);
    for (const it of this._iterators) if (it.wake) it.wake();
  }
}

// ---- the client --------------------------------------------------------------------------

/** @type {Required<ClientOptions>} */
const DEFAULTS = {
  token: null,
  getToken: null,
  anonymous: false,
  WebSocket: null,
  storage: null,
  storageKey: "broker",
  reconnect: true,
  reconnectTimeout: null,
  backoffInitial: 250,
  backoffMax: 10000,
  connectTimeout: 10000,
  requestTimeout: 30000,
  refreshAt: 0.8,
  dedupeWindow: 20000,
  maxBuffered: 10000,
};

/**
 * A connection to a broker that reconnects and resumes by itself.
 *
 * `new BrokerClient(urlOrUrls, {token | getToken, WebSocket, storage, ...})`. Events:
 * "connecting" ({url, attempt}), "connected" ({user, server, url}), "disconnected"
 * ({code, reason, willReconnect, delay, error}), "message" (every message, once), "gap",
 * "error" (errors that answer no request). `state` is one of "idle", "connecting",
 * "connected", "disconnected", "failed", "closed".
 * @extends {Emitter<ClientEvents>}
 */
export class BrokerClient extends Emitter {
  /**
   * @param {string | string[] | null} [urls] one ws(s):// URL or a list tried in turn; omitted in a page: ws(s)://<this host>/ws
   * @param {ClientOptions} [options]
   */
  constructor(urls, options = {}) {
    super();
    const list = urls === undefined || urls === null ? [defaultUrl()] : Array.isArray(urls) ? urls : [urls];
    if (!list.length) throw new TypeError("at least one broker URL is needed");
    /**
     * The broker URLs, tried in turn.
     * @readonly
     */
    this.urls = list.map(absoluteUrl);
    /**
     * The options, with the defaults filled in.
     * @readonly
     * @type {Required<ClientOptions>}
     */
    this.options = { ...DEFAULTS, ...options };
    if (!this.options.token && typeof this.options.getToken !== "function" && !this.options.anonymous) {
      throw new TypeError("a token or a getToken function is needed (or anonymous: true)");
    }
    const WS = this.options.WebSocket || /** @type {WebSocketClass | undefined} */ (globalThis.WebSocket);
    if (typeof WS !== "function") {
      throw new TypeError(
        "no WebSocket class: pass {WebSocket} (Node 20: run with --experimental-websocket)"
      );
    }
    /** @type {WebSocketClass} */
    this._WebSocket = WS;
    /** @type {string | null} */
    this._token = this.options.token || null;

    /**
     * The authenticated user ({id, name}) from the latest hello.
     * @type {User | null}
     */
    this.user = null;
    /**
     * The broker's `server` string (broker/<version>).
     * @type {string | null}
     */
    this.server = null;
    /**
     * The URL of the current or last connection.
     * @type {string | null}
     */
    this.url = null;
    /**
     * The broker's history epoch, from the latest subscribe answer.
     * @type {string | null}
     */
    this.epoch = null;
    /** How many times the client reconnected after a first connection. */
    this.reconnects = 0;
    /**
     * The error that stopped the client (state "failed"), if any.
     * @type {BrokerError | null}
     */
    this.error = null;
    /**
     * "idle", "connecting", "connected", "disconnected", "failed" or "closed".
     * @type {State}
     */
    this.state = "idle";

    /** @type {WebSocketLike | null} */
    this._ws = null;
    this._nextId = 1;
    /** @type {Map<number, Pending>} */
    this._pending = new Map(); // id -> request, in creation order
    /** @type {Map<string, Subscription>} */
    this._subs = new Map(); // pattern -> Subscription
    /** @type {Set<number>} */
    this._seen = new Set();
    /** @type {number[]} */
    this._seenRing = []; // the same seqs in arrival order, a ring of dedupeWindow
    this._seenHead = 0;
    this._attempt = 0;
    this._urlIndex = 0;
    this._everConnected = false;
    /** @type {number | null} */
    this._downSince = null;
    /** @type {ReturnType<typeof setTimeout> | null} */
    this._retryTimer = null;
    /** @type {ReturnType<typeof setTimeout> | null} */
    this._refreshTimer = null;
    /** @type {{ resolve: () => void, reject: (error: BrokerError) => void }[]} */
    this._waiters = [];
    /** @type {{ url: string, error: ConnectionFailed } | null} */
    this._diagnosis = null;
    // The token of the latest auth frame (first or refresh), and whether getToken had just
    // given it: what a 4001 close refused.
    /** @type {string | null} */
    this._authToken = null;
    this._authFetched = false;
    /** @type {string | null} */
    this._storedUser = null; // the user whose subscriptions storage holds
    this._restore();
  }

  // -- lifecycle -----------------------------------------------------------------------

  /**
   * Connect (and keep reconnecting); resolves once connected, rejects if the client fails.
   * While waiting to retry ("disconnected"), it tries again at once.
   * @returns {Promise<void>}
   */
  connect() {
    if (this.state === "closed" || this.state === "failed") {
      return Promise.reject(this.error || new ConnectionLost("the client was closed"));
    }
    if (this.state === "connected") return Promise.resolve();
    /** @type {Promise<void>} */
    const waiting = new Promise((resolve, reject) => this._waiters.push({ resolve, reject }));
    if (this.state === "idle") {
      this._downSince = Date.now();
      this._open();
    } else if (this.state === "disconnected" && this._retryTimer !== null) {
      stopTimer(this._retryTimer);
      this._retryTimer = null;
      this._open();
    }
    return waiting;
  }

  /** Close for good: pending requests fail with ConnectionLost, iterators end. Stored positions are kept. */
  close() {
    if (this.state === "closed") return;
    const wasOpen = this._ws !== null;
    this._stopTimers();
    const ws = this._ws;
    this._ws = null;
    if (ws) {
      ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
      try {
        ws.close(1000, "bye");
      } catch (e) {
        /* already closed */
      }
    }
    const error = new ConnectionLost("the client was closed");
    this._finish("closed", error, false);
    if (wasOpen) {
      this.emit("disconnected", { code: 1000, reason: "closed by the client", willReconnect: false, delay: null, error: null });
    }
  }

  /** True while a connection is open and authenticated. */
  get connected() {
    return this.state === "connected";
  }

  /**
   * The subscriptions by pattern (restored ones included).
   * @returns {Map<string, Subscription>}
   */
  get subscriptions() {
    return new Map(this._subs);
  }

  // -- requests ------------------------------------------------------------------------

  /**
   * Subscribe to a topic or pattern; returns the Subscription at once. Options: `last` (the
   * latest N first), `latest` (the latest message of each matching topic first), `since`
   * (+`epoch`), `presence`. Subscribing again to a pattern returns
   * the same subscription (its position, restored from storage too, is kept).
   * @param {string} pattern
   * @param {SubscribeOptions} [options]
   * @returns {Subscription}
   */
  subscribe(pattern, options = {}) {
    if (typeof pattern !== "string" || !pattern) throw new TypeError("a topic or pattern is needed");
    if (this.state === "closed" || this.state === "failed") {
      throw this.error || new ConnectionLost("the client was closed");
    }
    if ([options.last != null, options.since != null, !!options.latest].filter(Boolean).length > 1) {
      throw new TypeError("give one of last, since and latest");
    }
    const existing = this._subs.get(pattern);
    if (existing && !existing.ended) {
      existing.restored = false;
      if (options.presence != null && !!options.presence !== existing.presence) {
        existing.presence = !!options.presence;
        if (this.connected) this._sendSub(existing);
      }
      return existing;
    }
    const sub = new Subscription(this, pattern, {
      presence: options.presence,
      since: options.since,
      epoch: options.epoch,
      last: options.last,
      latest: options.latest,
    });
    this._subs.set(pattern, sub);
    this._save();
    if (this.connected) this._sendSub(sub);
    return sub;
  }

  /**
   * Publish `data` (any JSON value) to `topic`; resolves to its seq once recorded. Options:
   * `key` (generated when absent: the publish is re-sent after a reconnect and the broker
   * records it once), `echo` (deliver it back to this connection too).
   * @param {string} topic
   * @param {Json} data
   * @param {PublishOptions} [options]
   * @returns {Promise<number>}
   */
  publish(topic, data, options = {}) {
    /** @type {Frame} */
    const frame = { op: "pub", topic, data, key: options.key ?? newKey() };
    if (options.echo) frame.echo = true;
    return this._request(frame, { retry: true }).then((reply) => reply.seq);
  }

  /**
   * Who is subscribed to exactly `topic` now: [{id, name, connections}].
   * @param {string} topic
   * @returns {Promise<PresenceUser[]>}
   */
  presence(topic) {
    return this._request({ op: "presence", topic }, { retry: true }).then((reply) => reply.users);
  }

  /**
   * The broker's figures (needs an admin token).
   * @returns {Promise<Record<string, Json>>}
   */
  stats() {
    return this._request({ op: "stats" }, { retry: true }).then((reply) => {
      const { op, id, ...figures } = reply;
      return figures;
    });
  }

  // -- internals: connecting -----------------------------------------------------------

  async _open() {
    if (this._ws || this.state === "closed" || this.state === "failed") return;
    const url = this.urls[this._urlIndex % this.urls.length];
    this._urlIndex += 1;
    this._attempt += 1;
    this._setState("connecting", { url, attempt: this._attempt });
    const held = this._token;
    /** @type {string | null} */
    let token;
    try {
      token = await this._currentToken();
    } catch (err) {
      if (this.state !== "connecting") return;
      this._lost({ code: null, reason: `getToken failed: ${describe(err)}`, opened: false });
      return;
    }
    if (this.state !== "connecting" || this._ws) return;
    /** @type {WebSocketLike} */
    let ws;
    try {
      ws = new this._WebSocket(url);
    } catch (err) {
      this._fail(new ConnectionFailed(`cannot connect to ${url}: ${describe(err)}`));
      return;
    }
    this._ws = ws;
    const fetched = token !== held; // getToken gave it just now
    /** @type {{ opened: boolean, hello: boolean, authError: string | null, timedOut: boolean }} */
    const conn = { opened: false, hello: false, authError: null, timedOut: false };
    const timer = setTimeout(() => {
      if (ws === this._ws && !conn.hello) {
        conn.timedOut = true;
        try {
          ws.close();
        } catch (e) {
          /* closing anyway */
        }
        this._onClose(ws, conn, { code: CloseCode.ABNORMAL, reason: "" }, url);
      }
    }, this.options.connectTimeout);
    ws.onopen = () => {
      conn.opened = true;
      this._authToken = token;
      this._authFetched = fetched;
      // No token: an anonymous connection, which reads public topics only.
      ws.send(JSON.stringify(token ? { op: "auth", token } : { op: "auth" }));
    };
    ws.onmessage = (ev) => {
      if (ws !== this._ws) return;
      let frame;
      try {
        frame = JSON.parse(ev.data);
      } catch (e) {
        return;
      }
      if (!frame || typeof frame !== "object") return;
      if (!conn.hello) {
        if (frame.op === "hello") {
          conn.hello = true;
          clearTimeout(timer);
          this._token = token;
          this._onHello(frame, url);
        } else if (frame.op === "error") {
          conn.authError = typeof frame.message === "string" ? frame.message : "unauthorized";
        }
        return;
      }
      this._dispatch(frame);
    };
    ws.onerror = () => {
      // Browsers follow with a close event; Node 20's WebSocket does not when the
      // connection is refused, and stays CONNECTING: treat the error as the close.
      if (!conn.opened) {
        clearTimeout(timer);
        this._onClose(ws, conn, { code: CloseCode.ABNORMAL, reason: "" }, url);
      }
    };
    ws.onclose = (ev) => {
      clearTimeout(timer);
      this._onClose(ws, conn, ev, url);
    };
  }

  /**
   * The token to connect with: the one held while it has more than 5 s left, else getToken's.
   * @returns {Promise<string | null>}
   */
  async _currentToken() {
    const token = this._token;
    const exp = tokenExpiry(token);
    const fresh = token && (exp === null || exp - Date.now() > 5000);
    if (fresh || typeof this.options.getToken !== "function") return token;
    const next = await this.options.getToken();
    if (typeof next !== "string" || !next) throw new Unauthorized("getToken returned no token");
    this._token = next;
    return next;
  }

  /**
   * @param {Frame} frame
   * @param {string} url
   */
  _onHello(frame, url) {
    const user = frame.user && typeof frame.user === "object" ? frame.user : {};
    const id = String(user.id ?? "");
    const previous = this._storedUser;
    this.user = { id, name: typeof user.name === "string" ? user.name : id };
    this.server = typeof frame.server === "string" ? frame.server : "";
    this.url = url;
    if (previous !== null && previous !== id) {
      // Stored for another user: their inbox and positions are not ours.
      for (const sub of [...this._subs.values()]) {
        if (sub.restored) {
          this._subs.delete(sub.pattern);
          sub._end(null);
        }
      }
    }
    this._storedUser = id;
    if (this._everConnected) this.reconnects += 1;
    this._everConnected = true;
    this._attempt = 0;
    this._downSince = null;
    // Resume first: a subscription made by a "connected" listener is then sent once.
    this.state = "connected";
    this._resume();
    this._scheduleRefresh();
    this._setState("connected", { user: this.user, server: this.server, url });
    const waiters = this._waiters.splice(0);
    for (const w of waiters) w.resolve();
  }

  /**
   * @param {WebSocketLike} ws
   * @param {{ opened: boolean, hello: boolean, authError: string | null, timedOut: boolean }} conn
   * @param {{ code?: number, reason?: string }} ev
   * @param {string} url
   */
  _onClose(ws, conn, ev, url) {
    if (ws !== this._ws) return;
    this._ws = null;
    ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
    if (ws.readyState === 0 || ws.readyState === 1) {
      try {
        ws.close();
      } catch (e) {
        /* closing anyway */
      }
    }
    stopTimer(this._refreshTimer);
    this._refreshTimer = null;
    const code = typeof ev.code === "number" ? ev.code : CloseCode.ABNORMAL;
    const reason = conn.authError || ev.reason || "";
    this._lost({ code, reason, opened: conn.opened, hello: conn.hello, timedOut: conn.timedOut, url });
  }

  /** @param {LostInfo} info */
  _lost(info) {
    if (this.state === "closed" || this.state === "failed") return;
    const { code, reason } = info;
    for (const [id, req] of this._pending) {
      req.sent = false;
      if (!req.retry) {
        // Not worth repeating on the next connection (unsub, a token refresh).
        this._pending.delete(id);
        stopTimer(req.timer);
        req.reject(new ConnectionLost(`connection lost (close ${code}) before the broker answered`));
      }
    }
    for (const sub of this._subs.values()) sub.active = false;
    const hasGetToken = typeof this.options.getToken === "function";
    let fatal = null;
    let delay = null;
    // After a working connection a new token is fetched at once; again and again only with backoff.
    const soon = this._attempt === 0 ? 0 : null;
    if (code === CloseCode.UNAUTHORIZED) {
      // The broker refused the token of the latest auth frame. Whether it expired is read from
      // the token's own `exp`, never from the reason's words.
      const refused = this._authToken;
      const exp = tokenExpiry(refused);
      if (exp !== null && exp <= Date.now()) {
        if (hasGetToken) {
          this._token = null; // ask getToken for a new one
          delay = soon;
        } else {
          fatal = new TokenExpired(reason || "token expired");
        }
      } else if (hasGetToken && !this._authFetched) {
        // A token held from before (given, or fetched earlier): the broker's clock may be
        // ahead of ours, or it was revoked. One fresh token from getToken, then give up.
        this._token = null;
        delay = soon;
      } else {
        fatal = new Unauthorized(reason || "token refused");
      }
    } else if (code === CloseCode.TOKEN_EXPIRED) {
      if (hasGetToken) {
        this._token = null;
        delay = soon;
      } else {
        fatal = new TokenExpired(reason || "token expired");
      }
    } else if (!this.options.reconnect) {
      fatal = info.hello
        ? new ConnectionLost(`connection to ${info.url} lost (close ${code}${reason ? ": " + reason : ""})`)
        : new ConnectionFailed(`cannot connect to ${info.url || this.urls[0]}${reason ? ": " + reason : ""}`);
    } else if (
      this.options.reconnectTimeout != null &&
      this._downSince !== null &&
      Date.now() - this._downSince > this.options.reconnectTimeout
    ) {
      fatal = new ConnectionFailed(`could not reconnect within ${this.options.reconnectTimeout} ms`);
    }
    if (this._downSince === null) this._downSince = Date.now();
    if (fatal) {
      this._fail(fatal, { code, reason });
      return;
    }
    if (delay === null) {
      // Full jitter: a uniform delay in [0, min(max, initial * 2^attempt)].
      const cap = Math.min(this.options.backoffMax, this.options.backoffInitial * 2 ** Math.max(0, this._attempt - 1));
      delay = Math.round(Math.random() * cap);
    }
    /** @param {BrokerError | null} error */
    const report = (error) => {
      if (this.state === "closed" || this.state === "failed") return;
      this._setState("disconnected", { code, reason, willReconnect: true, delay, error });
      stopTimer(this._retryTimer);
      this._retryTimer = setTimeout(() => {
        this._retryTimer = null;
        this._open();
      }, delay);
    };
    const url = info.url;
    if (!info.opened && url && !info.timedOut && code !== null) {
      // One look at /healthz when the broker first becomes unreachable, then every fifth
      // attempt (each failed fetch is a line in the browser's console).
      const cached = this._diagnosis && this._diagnosis.url === url ? this._diagnosis : null;
      if (cached && this._attempt > 1 && this._attempt % 5 !== 1) {
        report(cached.error);
      } else {
        this._diagnose(url).then((error) => {
          this._diagnosis = { url, error };
          report(error);
        });
      }
    } else {
      report(info.hello ? null : new ConnectionFailed(`cannot connect to ${info.url || "the broker"}${reason ? ": " + reason : ""}`));
    }
  }

  /**
   * Why a socket failed before it opened: the broker down, or up and refusing the handshake.
   * @param {string} url
   * @returns {Promise<ConnectionFailed>}
   */
  async _diagnose(url) {
    const unreachable = new ConnectionFailed(`cannot reach the broker at ${url}`);
    if (typeof fetch !== "function") return unreachable;
    const inPage = typeof document !== "undefined";
    const abort = typeof AbortController === "function" ? new AbortController() : null;
    const timer = abort ? setTimeout(() => abort.abort(), 2000) : null;
    try {
      const response = await fetch(healthzUrl(url), {
        cache: "no-store",
        mode: inPage ? "no-cors" : "cors",
        signal: abort ? abort.signal : undefined,
      });
      // An opaque (no-cors) answer still proves the server is up; a readable one must be 200.
      if (response.type === "opaque" || response.ok) {
        const origin = globalThis.location && globalThis.location.origin;
        return new ConnectionFailed(
          `the broker at ${url} is up but refused the WebSocket handshake` +
            (origin && origin !== "null"
              ? ` (HTTP 403: is this page's origin ${origin} in its --allowed-origin list? or 503: too many connections)`
              : " (HTTP 403 origin not allowed, or 503 too many connections)"),
          { handshakeRefused: true }
        );
      }
      return unreachable;
    } catch (e) {
      return unreachable;
    } finally {
      if (timer) clearTimeout(timer);
    }
  }

  /**
   * @param {BrokerError} error
   * @param {{ code?: number | null, reason?: string }} [closeInfo]
   */
  _fail(error, closeInfo = {}) {
    this._stopTimers();
    const ws = this._ws;
    this._ws = null;
    if (ws) {
      ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
      try {
        ws.close();
      } catch (e) {
        /* already closed */
      }
    }
    this._finish("failed", error, true, closeInfo);
  }

  /**
   * @param {"failed" | "closed"} state
   * @param {BrokerError} error
   * @param {boolean} failed
   * @param {{ code?: number | null, reason?: string }} [closeInfo]
   */
  _finish(state, error, failed, closeInfo = {}) {
    this.error = failed ? error : null;
    for (const req of this._pending.values()) {
      stopTimer(req.timer);
      req.reject(error);
    }
    this._pending.clear();
    for (const sub of this._subs.values()) sub._end(failed ? error : null);
    const waiters = this._waiters.splice(0);
    for (const w of waiters) w.reject(error);
    this._setState(state, null);
    if (failed) {
      this.emit("disconnected", {
        code: closeInfo.code ?? null,
        reason: closeInfo.reason || error.message,
        willReconnect: false,
        delay: null,
        error,
      });
    }
  }

  _stopTimers() {
    stopTimer(this._retryTimer);
    stopTimer(this._refreshTimer);
    this._retryTimer = this._refreshTimer = null;
  }

  /**
   * @param {State} state
   * @param {ConnectingEvent | ConnectedEvent | DisconnectedEvent | null} detail the event of that state
   */
  _setState(state, detail) {
    this.state = state;
    if (detail && (state === "connecting" || state === "connected" || state === "disconnected")) {
      this.emit(state, /** @type {any} */ (detail)); // the callers pass the state's own event
    }
    this.emit("state", state);
  }

  /**
   * Send on the open connection; false when there is none.
   * @param {Frame} frame
   * @returns {boolean}
   */
  _send(frame) {
    const ws = this._ws;
    if (!ws || this.state !== "connected" || ws.readyState !== 1) return false;
    ws.send(JSON.stringify(frame));
    return true;
  }

  /** On a new connection: re-subscribe every confirmed subscription, then resend what is pending. */
  _resume() {
    for (const sub of this._subs.values()) {
      if (!sub.ended) this._sendSub(sub);
    }
    for (const req of this._pending.values()) {
      if (!req.sent && !req.sub && !req.waitingRetry) req.sent = this._send(req.frame);
    }
  }

  // -- internals: token refresh --------------------------------------------------------

  _scheduleRefresh() {
    stopTimer(this._refreshTimer);
    this._refreshTimer = null;
    if (typeof this.options.getToken !== "function") return;
    const exp = tokenExpiry(this._token);
    if (exp === null) return;
    const remaining = exp - Date.now();
    if (remaining <= 1000) return; // the broker closes with 4003 and we reconnect with a new one
    const delay = Math.max(500, remaining * this.options.refreshAt);
    this._refreshTimer = setTimeout(() => this._refresh(), delay);
  }

  async _refresh() {
    this._refreshTimer = null;
    const ws = this._ws;
    try {
      const getToken = this.options.getToken;
      if (getToken === null) return;
      const token = await getToken();
      if (ws !== this._ws || this.state !== "connected") return;
      this._authToken = token;
      this._authFetched = true;
      await this._request({ op: "auth", token }, { retry: false });
      this._token = token;
      this._scheduleRefresh();
    } catch (err) {
      if (ws !== this._ws || this.state !== "connected") return;
      this.emit("error", err instanceof BrokerError ? err : new Unauthorized(`token refresh failed: ${describe(err)}`));
      // Try again a little later; if exp passes meanwhile the 4003 reconnect fetches one.
      const exp = tokenExpiry(this._token);
      if (exp !== null && exp - Date.now() > 1500) this._refreshTimer = setTimeout(() => this._refresh(), 1000);
    }
  }

  // -- internals: requests -------------------------------------------------------------

  /**
   * Send a request (now, or once connected); resolves to its `ok`, rejects with its `error`.
   * @param {Frame} frame
   * @param {{ retry: boolean, sub?: Subscription | null, onReply?: ((reply: Frame) => void) | null }} how
   *   retry: send it again on the next connection; onReply: called with the `ok` before it resolves
   * @returns {Promise<Frame>}
   */
  _request(frame, { retry, sub = null, onReply = null }) {
    if (this.state === "closed" || this.state === "failed") {
      return Promise.reject(this.error || new ConnectionLost("the client was closed"));
    }
    return new Promise((resolve, reject) => {
      const id = this._nextId++;
      frame.id = id;
      /** @type {Pending} */
      const req = { frame, resolve, reject, retry, sub, onReply, sent: false, timer: null, waitingRetry: false, lastError: null };
      if (this.options.requestTimeout != null) {
        req.timer = setTimeout(() => {
          if (this._pending.get(id) !== req) return;
          this._pending.delete(id);
          const what = frame.op === "pub" ? " (the publish may or may not have been recorded)" : "";
          req.reject(req.lastError || new RequestTimeout(`no answer to ${frame.op} within ${this.options.requestTimeout} ms${what}`, { requestId: id }));
        }, this.options.requestTimeout);
      }
      this._pending.set(id, req);
      req.sent = this._send(frame);
    });
  }

  /** @param {Subscription} sub */
  _sendSub(sub) {
    // A sub sent again replaces the previous one on the broker: drop the older request.
    for (const [id, req] of this._pending) {
      if (req.sub === sub) {
        stopTimer(req.timer);
        this._pending.delete(id);
      }
    }
    /** @type {Frame} */
    const frame = { op: "sub", topic: sub.pattern };
    const since = sub.since;
    const epoch = sub.epoch;
    if (since !== null) {
      frame.since = since;
      if (epoch) frame.epoch = epoch;
    } else if (sub.last !== null) {
      frame.last = sub.last;
    } else if (sub.latest) {
      frame.latest = true;
    }
    if (sub.presence) frame.presence = true;
    const resumed = sub.confirmed;
    this._request(frame, {
      retry: true,
      sub,
      onReply: (reply) => this._applySubReply(sub, since, epoch, reply, resumed),
    }).catch((err) => this._onSubRefused(sub, err));
  }

  /**
   * @param {Frame} frame
   * @returns {void}
   */
  _dispatch(frame) {
    switch (frame.op) {
      case "msg":
        return this._onMsg(frame);
      case "ok":
      case "error":
        return this._onReply(frame);
      case "join":
      case "leave": {
        /** @type {PresenceEvent} */
        const ev = { topic: frame.topic, user: frame.user };
        for (const sub of this._subs.values()) {
          if (sub.presence && sub.pattern === frame.topic) sub.emit(frame.op, ev);
        }
        this.emit(frame.op, ev);
        return undefined;
      }
      default:
        return undefined; // future ops
    }
  }

  /** @param {Frame} frame an `ok` or `error` */
  _onReply(frame) {
    const req = typeof frame.id === "number" ? this._pending.get(frame.id) : undefined;
    if (!req) {
      if (frame.op === "error") this.emit("error", errorForCode(frame.code, frame.message, frame.id));
      return;
    }
    if (frame.op === "ok") {
      this._pending.delete(frame.id);
      stopTimer(req.timer);
      if (req.onReply) req.onReply(frame);
      req.resolve(frame);
      return;
    }
    const err = errorForCode(frame.code, frame.message, frame.id);
    if (frame.code === "unavailable" && req.frame.op === "pub" && this.options.reconnect) {
      // Not recorded: send it again a little later (same key, so at most once recorded).
      req.lastError = err;
      req.sent = false;
      req.waitingRetry = true;
      setTimeout(() => {
        req.waitingRetry = false;
        if (this._pending.get(frame.id) === req && !req.sent) req.sent = this._send(req.frame);
      }, Math.min(this.options.backoffMax, 500));
      return;
    }
    this._pending.delete(frame.id);
    stopTimer(req.timer);
    req.reject(err);
  }

  /**
   * @param {Subscription} sub
   * @param {BrokerError} err
   */
  _onSubRefused(sub, err) {
    if (this._subs.get(sub.pattern) !== sub) return;
    if (this.state === "closed" || this.state === "failed") return; // kept in storage for the next client
    this._subs.delete(sub.pattern);
    this._save();
    sub._end(err);
    sub.emit("error", err);
    if (sub.confirmed) this.emit("error", err); // a resumed subscription now refused (e.g. a new token's ACL)
  }

  /** @param {Subscription} sub */
  async _unsubscribe(sub) {
    if (this._subs.get(sub.pattern) === sub) {
      this._subs.delete(sub.pattern);
      this._save();
    }
    for (const [id, req] of this._pending) {
      if (req.sub === sub) {
        stopTimer(req.timer);
        this._pending.delete(id);
      }
    }
    if (this.connected) {
      try {
        await this._request({ op: "unsub", topic: sub.pattern }, { retry: false });
      } catch (e) {
        /* the connection went: nothing is subscribed on the next one */
      }
    }
  }

  /**
   * @param {Subscription} sub
   * @param {number | null} since what the sub asked from
   * @param {string | null} epoch
   * @param {Frame} reply its `ok`
   * @param {boolean} resumed
   */
  _applySubReply(sub, since, epoch, reply, resumed) {
    const newEpoch = typeof reply.epoch === "string" ? reply.epoch : "";
    const seq = typeof reply.seq === "number" ? reply.seq : 0;
    const recovered = reply.recovered !== false;
    if (this.epoch !== null && newEpoch !== this.epoch) {
      // History started over: seqs restart, the ones seen mean nothing now.
      this._seen.clear();
      this._seenRing = [];
      this._seenHead = 0;
    }
    this.epoch = newEpoch;
    sub.epoch = newEpoch;
    sub.confirmed = true;
    sub.active = true;
    if (since === null && sub.last === null && !sub.latest) {
      sub.since = Math.max(sub.since ?? 0, seq); // live from here on
    } else {
      sub.replayUntil = seq; // the replay follows, up to about `seq`
      if (!recovered && since !== null && (epoch !== newEpoch || since > seq)) {
        sub.since = 0; // another history, or since beyond it: the broker replays all it keeps
      }
    }
    this._save();
    /** @type {Subscribed} */
    const info = { seq, epoch: newEpoch, recovered, resumed };
    sub._resolveReady(info);
    sub.emit("subscribed", info);
    if (!recovered && resumed) {
      /** @type {Gap} */
      const gap = { pattern: sub.pattern, since, epoch, newEpoch, epochChanged: epoch !== null && epoch !== newEpoch };
      sub.emit("gap", gap);
      this.emit("gap", gap);
    }
  }

  /** @param {Frame} frame a `msg` */
  _onMsg(frame) {
    const seq = frame.seq;
    const topic = frame.topic;
    if (typeof seq !== "number" || typeof topic !== "string") return;
    /** @type {Subscription[]} */
    const targets = [];
    for (const sub of this._subs.values()) {
      if (!sub.active) continue;
      if (sub.replayUntil !== null && seq > sub.replayUntil) {
        // The first message past the sub's ok: its replay is complete.
        sub.since = Math.max(sub.since ?? 0, sub.replayUntil);
        sub.replayUntil = null;
        sub.last = null;
        sub.latest = false;
      }
      if (matches(sub.pattern, topic)) {
        sub.since = Math.max(sub.since ?? 0, seq);
        sub.last = null;
        sub.latest = false;
        targets.push(sub);
      }
    }
    this._save();
    if (this._seen.has(seq)) return;
    this._seen.add(seq);
    const ring = this._seenRing;
    if (ring.length < this.options.dedupeWindow) {
      ring.push(seq);
    } else {
      this._seen.delete(ring[this._seenHead]);
      ring[this._seenHead] = seq;
      this._seenHead = (this._seenHead + 1) % ring.length;
    }
    const msg = message(frame);
    this.emit("message", msg);
    for (const sub of targets) sub._deliver(msg);
  }

  // -- internals: storage --------------------------------------------------------------

  _restore() {
    const storage = this.options.storage;
    this._storedUser = null;
    if (!storage) return;
    /** @type {any} */
    let saved;
    try {
      saved = JSON.parse(storage.getItem(this.options.storageKey + ".subs") || "null");
    } catch (e) {
      saved = null;
    }
    if (!saved || typeof saved !== "object" || !Array.isArray(saved.subs)) return;
    this._storedUser = typeof saved.user === "string" ? saved.user : null;
    if (typeof saved.epoch === "string") this.epoch = saved.epoch;
    for (const s of saved.subs) {
      if (!s || typeof s.pattern !== "string" || !s.pattern) continue;
      const known = typeof s.since === "number";
      this._subs.set(
        s.pattern,
        new Subscription(this, s.pattern, {
          presence: !!s.presence,
          since: known ? s.since : null,
          epoch: typeof s.epoch === "string" ? s.epoch : null,
          last: typeof s.last === "number" ? s.last : null,
          latest: s.latest === true,
          confirmed: known,
          restored: true,
        })
      );
    }
  }

  _save() {
    const storage = this.options.storage;
    if (!storage) return;
    const subs = [];
    for (const sub of this._subs.values()) {
      // A replay in progress is not done yet: resume from where it had got to.
      subs.push({
        pattern: sub.pattern,
        presence: sub.presence,
        since: sub.since,
        epoch: sub.epoch,
        last: sub.last,
        latest: sub.latest,
      });
    }
    const state = { user: this._storedUser ?? (this.user ? this.user.id : null), epoch: this.epoch, subs };
    try {
      storage.setItem(this.options.storageKey + ".subs", JSON.stringify(state));
    } catch (e) {
      /* storage full or disabled: positions live in memory only */
    }
  }
}

export default BrokerClient;

// ---- types (JSDoc; broker.d.ts is generated from them) -----------------------------------

/** @typedef {Json[]} JsonArray */
/** @typedef {{ [key: string]: Json }} JsonObject */
/**
 * A JSON value, as `data` of a message.
 * @typedef {null | boolean | number | string | JsonArray | JsonObject} Json
 */

/**
 * A user as the broker names it.
 * @typedef {object} User
 * @property {string} id
 * @property {string} name
 */

/**
 * A published message.
 * @template [T=Json]
 * @typedef {object} Message
 * @property {string} topic
 * @property {number} seq Broker-wide sequence number, increasing.
 * @property {T} data
 * @property {User} from
 * @property {number} ts The broker's receive time, ms since the Unix epoch.
 */

/**
 * The broker's answer to a subscription (sent again on every resume).
 * @typedef {object} Subscribed
 * @property {number} seq
 * @property {string} epoch
 * @property {boolean} recovered
 * @property {boolean} resumed True when this answers a resume after a reconnect or a page reload.
 */

/**
 * A resume that could not recover every missed message.
 * @typedef {object} Gap
 * @property {string} pattern
 * @property {number | null} since
 * @property {string | null} epoch
 * @property {string} newEpoch
 * @property {boolean} epochChanged True when the broker's history started over (e.g. a memory broker restarted).
 */

/**
 * A user joined or left a topic (subscriptions made with `presence: true`).
 * @typedef {object} PresenceEvent
 * @property {string} topic
 * @property {User} user
 */

/**
 * A user subscribed to a topic, with how many of their connections are.
 * @typedef {User & { connections: number }} PresenceUser
 */

/**
 * The client's state: "disconnected" while waiting to retry, "failed" when `client.error` stopped it.
 * @typedef {"idle" | "connecting" | "connected" | "disconnected" | "failed" | "closed"} State
 */

/**
 * The "connecting" event: an attempt at `url` begins.
 * @typedef {object} ConnectingEvent
 * @property {string} url
 * @property {number} attempt
 */

/**
 * The "connected" event: authenticated (`server` is the broker's broker/<version>).
 * @typedef {object} ConnectedEvent
 * @property {User} user
 * @property {string} server
 * @property {string} url
 */

/**
 * The "disconnected" event: a connection ended, or an attempt failed.
 * @typedef {object} DisconnectedEvent
 * @property {number | null} code The WebSocket close code (1006 when the connection failed; null when no socket was made).
 * @property {string} reason
 * @property {boolean} willReconnect
 * @property {number | null} delay Milliseconds until the next attempt, when reconnecting.
 * @property {BrokerError | null} error Why, when it is an error (ConnectionFailed, Unauthorized, ...).
 */

/**
 * What `sessionStorage` and `localStorage` offer, all the client needs.
 * @typedef {object} StorageLike
 * @property {(key: string) => string | null} getItem
 * @property {(key: string, value: string) => void} setItem
 */

/**
 * A WebSocket, as far as the client uses one.
 * @typedef {object} WebSocketLike
 * @property {number} readyState
 * @property {(data: string) => void} send
 * @property {(code?: number, reason?: string) => void} close
 * @property {((ev: any) => any) | null} onopen
 * @property {((ev: { data: any }) => any) | null} onmessage
 * @property {((ev: { code: number, reason: string }) => any) | null} onclose
 * @property {((ev: any) => any) | null} onerror
 */

/**
 * A WebSocket class: the browser's, Node 22's global, or one passed in.
 * @typedef {new (url: string) => WebSocketLike} WebSocketClass
 */

/**
 * The options of `new BrokerClient(urls, options)`: a `token` or a `getToken` is needed.
 * @typedef {object} ClientOptions
 * @property {string | null} [token] A JWT. With `getToken` too, used first.
 * @property {(() => string | Promise<string>) | null} [getToken] Returns a fresh JWT; called when there is none or it is about to expire, and before `exp` to refresh in place.
 * @property {boolean} [anonymous] Connect without a token: read the broker's public topics only (docs/protocol.md, "Public topics").
 * @property {WebSocketClass | null} [WebSocket] The WebSocket class (default: the global one).
 * @property {StorageLike | null} [storage] Keeps subscriptions and their positions across page reloads (e.g. `sessionStorage`).
 * @property {string} [storageKey] Prefix of the storage key (default "broker").
 * @property {boolean} [reconnect] Reconnect after a lost connection (default true).
 * @property {number | null} [reconnectTimeout] Give up (state "failed") when not connected again within this many ms (default: never).
 * @property {number} [backoffInitial] First backoff ceiling in ms (default 250); doubles per attempt up to `backoffMax` (10000).
 * @property {number} [backoffMax]
 * @property {number} [connectTimeout] Ms to wait for the broker's hello (default 10000).
 * @property {number | null} [requestTimeout] Ms to wait for an answer to a request, queued time included (default 30000; null: forever).
 * @property {number} [refreshAt] Refresh the token at this fraction of its remaining lifetime (default 0.8).
 * @property {number} [dedupeWindow] How many recent seqs are remembered to drop duplicates (default 20000).
 * @property {number} [maxBuffered] Messages kept for a subscription that has no listener or iterator yet (default 10000).
 */

/**
 * The options of `client.subscribe(pattern, options)`.
 * @typedef {object} SubscribeOptions
 * @property {number} [last] Replay the latest N retained messages first.
 * @property {boolean} [latest] Replay the latest retained message of each matching topic first (a scoreboard's current scores).
 * @property {number} [since] Replay every retained message after this seq first (with `epoch`, the history it was seen in).
 * @property {string} [epoch]
 * @property {boolean} [presence] Ask for join/leave events on this exact topic.
 */

/**
 * The options of `client.publish(topic, data, options)`.
 * @typedef {object} PublishOptions
 * @property {string} [key] Idempotency key (1 to 128 characters); generated when absent.
 * @property {boolean} [echo] Deliver the message to this connection too.
 */

/**
 * The client's events and what each passes to its listeners.
 * @typedef {object} ClientEvents
 * @property {ConnectingEvent} connecting
 * @property {ConnectedEvent} connected
 * @property {DisconnectedEvent} disconnected
 * @property {State} state
 * @property {Message} message
 * @property {Gap} gap
 * @property {PresenceEvent} join
 * @property {PresenceEvent} leave
 * @property {BrokerError} error
 */

/**
 * A subscription's events and what each passes to its listeners.
 * @typedef {object} SubscriptionEvents
 * @property {Message} message
 * @property {Subscribed} subscribed
 * @property {Gap} gap
 * @property {PresenceEvent} join
 * @property {PresenceEvent} leave
 * @property {BrokerError} error
 */

/**
 * A frame as it is on the wire (parsed JSON: fields are checked where they are read).
 * @internal
 * @typedef {Record<string, any>} Frame
 */

/**
 * A request waiting for its `ok` or `error`.
 * @internal
 * @typedef {object} Pending
 * @property {Frame} frame
 * @property {(reply: Frame) => void} resolve
 * @property {(error: BrokerError) => void} reject
 * @property {boolean} retry send it again on the next connection
 * @property {Subscription | null} sub
 * @property {((reply: Frame) => void) | null} onReply
 * @property {boolean} sent
 * @property {ReturnType<typeof setTimeout> | null} timer
 * @property {boolean} waitingRetry
 * @property {BrokerError | null} lastError
 */

/**
 * Why a connection ended, for `_lost`.
 * @internal
 * @typedef {object} LostInfo
 * @property {number | null} code
 * @property {string} reason
 * @property {boolean} opened
 * @property {boolean} [hello]
 * @property {boolean} [timedOut]
 * @property {string} [url]
 */
