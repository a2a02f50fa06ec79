// Type declarations for broker.js, the broker's client library (docs/web.md).
// Generated from broker.js's JSDoc by tests/js/declarations.mjs (TypeScript 5.9.3): do not edit;
// change the JSDoc in broker.js and run `node tests/js/declarations.mjs`.

/**
 * The error class instance for a wire error `code` (unknown codes give a plain BrokerError).
 * @param {string} code
 * @param {string} [message]
 * @param {number} [requestId]
 * @returns {BrokerError}
 */
export function errorForCode(code: string, message?: string, requestId?: number): BrokerError;
/**
 * MQTT-style match of a topic against a pattern (docs/protocol.md, section 4).
 * @param {string} pattern
 * @param {string} topic
 * @returns {boolean}
 */
export function matches(pattern: string, topic: string): boolean;
/**
 * The claims of a JWT read without verifying it (null when unreadable).
 * @param {string} token
 * @returns {Record<string, unknown> | null}
 */
export function decodeToken(token: string): Record<string, unknown> | null;
/** WebSocket close codes of the protocol (docs/protocol.md, section 6). */
export const CloseCode: Readonly<{
    NORMAL: 1000;
    GOING_AWAY: 1001;
    ABNORMAL: 1006;
    TOO_BIG: 1009;
    UNAUTHORIZED: 4001;
    TOKEN_EXPIRED: 4003;
    SLOW_CONSUMER: 4008;
}>;
/** A request the broker refused, or a connection problem; `code` is the wire error code. */
export class BrokerError extends Error {
    /** The wire error code of this class (client-side codes for the client's own errors). */
    static code: string;
    /**
     * @param {string} [message]
     * @param {{ requestId?: number }} [options]
     */
    constructor(message?: string, options?: {
        requestId?: number;
    });
    /** The protocol error code ("bad_request", ...), or a client-side one ("connection_lost", ...). */
    code: string;
    /**
     * The id of the request this error answers, when there was one.
     * @type {number | undefined}
     */
    requestId: number | undefined;
}
/** code "bad_request": malformed frame, bad field, invalid topic or pattern. */
export class BadRequest extends BrokerError {
}
/** code "unauthorized": missing, invalid or refused token (close 4001). */
export class Unauthorized extends BrokerError {
}
/** An expired token: close 4003, or a token refused (4001) whose own `exp` has passed. */
export class TokenExpired extends Unauthorized {
}
/** code "forbidden": ACL, reserved topic, another user's inbox, stats without admin. */
export class Forbidden extends BrokerError {
}
/** code "rate_limited": over the connection's publish rate. */
export class RateLimited extends BrokerError {
}
/** code "unavailable": the broker cannot take the request now (store down, shutting down). */
export class Unavailable extends BrokerError {
}
/** code "internal": the broker failed. */
export class InternalError extends BrokerError {
}
/** Client side: no connection could be made (`handshakeRefused` when HTTP answered but the WebSocket was refused). */
export class ConnectionFailed extends BrokerError {
    /**
     * @param {string} [message]
     * @param {{ requestId?: number, handshakeRefused?: boolean }} [options]
     */
    constructor(message?: string, options?: {
        requestId?: number;
        handshakeRefused?: boolean;
    });
    /** True when the broker answered plain HTTP but refused the WebSocket handshake (origin check, capacity). */
    handshakeRefused: boolean;
}
/** Client side: the connection was lost or the client closed, and it will not come back. */
export class ConnectionLost extends BrokerError {
}
/** Client side: no answer within `requestTimeout`. */
export class RequestTimeout extends BrokerError {
}
/**
 * A minimal event emitter: `on` returns a function that removes the listener.
 * @template Events the event names and what each passes to its listeners
 */
export class Emitter<Events> {
    /**
     * Call `listener` on each `event`; returns a function that stops it.
     * @template {keyof Events} K
     * @param {K} event
     * @param {(arg: Events[K]) => void} listener
     * @returns {() => void}
     */
    on<K extends keyof Events>(event: K, listener: (arg: Events[K]) => void): () => void;
    /**
     * Call `listener` on the next `event` only.
     * @template {keyof Events} K
     * @param {K} event
     * @param {(arg: Events[K]) => void} listener
     * @returns {() => void}
     */
    once<K extends keyof Events>(event: K, listener: (arg: Events[K]) => void): () => void;
    /**
     * Remove a listener added with `on`.
     * @template {keyof Events} K
     * @param {K} event
     * @param {(arg: Events[K]) => void} listener
     */
    off<K extends keyof Events>(event: K, listener: (arg: Events[K]) => void): void;
    /**
     * The number of listeners of `event`.
     * @param {keyof Events} event
     * @returns {number}
     */
    listenerCount(event: keyof Events): number;
}
/**
 * One subscription to a topic or pattern. Events: "message" (a message), "subscribed"
 * ({seq, epoch, recovered, resumed}), "gap" (a resume could not recover everything),
 * "join"/"leave" ({topic, user}, with presence), "error" (the broker refused it; it ends).
 * Iterate it with `for await (const msg of sub)`.
 * @extends {Emitter<SubscriptionEvents>}
 * @implements {AsyncIterable<Message>}
 */
export class Subscription extends Emitter<SubscriptionEvents> implements AsyncIterable<Message> {
    /** @readonly */
    readonly client: BrokerClient;
    /**
     * The topic or pattern.
     * @readonly
     */
    readonly pattern: string;
    /** True when join/leave events are asked for. */
    presence: boolean;
    /** True once unsubscribed, refused, or the client closed or failed. */
    ended: boolean;
    /**
     * The first answer of the broker; rejects when it refuses the subscription.
     * @readonly
     * @type {Promise<Subscribed>}
     */
    readonly ready: Promise<Subscribed>;
    /**
     * "pending" (waiting for the broker's answer, or for a connection), "active" or "ended".
     * @returns {"pending" | "active" | "ended"}
     */
    get state(): "pending" | "active" | "ended";
    /**
     * Where a resume starts: `{since, epoch}` (since null before anything is known).
     * @returns {{ since: number | null, epoch: string | null }}
     */
    get position(): {
        since: number | null;
        epoch: string | null;
    };
    /** Stop the subscription (the broker is told when connected); iterators end. */
    unsubscribe(): Promise<void>;
    /** @returns {AsyncIterableIterator<Message>} */
    [Symbol.asyncIterator](): AsyncIterableIterator<Message>;
}
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
export class BrokerClient extends Emitter<ClientEvents> {
    /**
     * @param {string | string[] | null} [urls] one ws(s):// URL or a list tried in turn; omitted in a page: ws(s)://<this host>/ws
     * @param {ClientOptions} [options]
     */
    constructor(urls?: string | string[] | null, options?: ClientOptions);
    /**
     * The broker URLs, tried in turn.
     * @readonly
     */
    readonly urls: string[];
    /**
     * The options, with the defaults filled in.
     * @readonly
     * @type {Required<ClientOptions>}
     */
    readonly options: Required<ClientOptions>;
    /**
     * The authenticated user ({id, name}) from the latest hello.
     * @type {User | null}
     */
    user: User | null;
    /**
     * The broker's `server` string (broker/<version>).
     * @type {string | null}
     */
    server: string | null;
    /**
     * The URL of the current or last connection.
     * @type {string | null}
     */
    url: string | null;
    /**
     * The broker's history epoch, from the latest subscribe answer.
     * @type {string | null}
     */
    epoch: string | null;
    /** How many times the client reconnected after a first connection. */
    reconnects: number;
    /**
     * The error that stopped the client (state "failed"), if any.
     * @type {BrokerError | null}
     */
    error: BrokerError | null;
    /**
     * "idle", "connecting", "connected", "disconnected", "failed" or "closed".
     * @type {State}
     */
    state: State;
    /**
     * Connect (and keep reconnecting); resolves once connected, rejects if the client fails.
     * While waiting to retry ("disconnected"), it tries again at once.
     * @returns {Promise<void>}
     */
    connect(): Promise<void>;
    /** Close for good: pending requests fail with ConnectionLost, iterators end. Stored positions are kept. */
    close(): void;
    /** True while a connection is open and authenticated. */
    get connected(): boolean;
    /**
     * The subscriptions by pattern (restored ones included).
     * @returns {Map<string, Subscription>}
     */
    get subscriptions(): Map<string, Subscription>;
    /**
     * Subscribe to a topic or pattern; returns the Subscription at once. Options: `last` (the
     * latest N first), `latest` (the latest message of each matching topic first), `since`
     * (+`epoch`), `presence`. Subscribing again to a pattern returns
     * the same subscription (its position, restored from storage too, is kept).
     * @param {string} pattern
     * @param {SubscribeOptions} [options]
     * @returns {Subscription}
     */
    subscribe(pattern: string, options?: SubscribeOptions): Subscription;
    /**
     * Publish `data` (any JSON value) to `topic`; resolves to its seq once recorded. Options:
     * `key` (generated when absent: the publish is re-sent after a reconnect and the broker
     * records it once), `echo` (deliver it back to this connection too).
     * @param {string} topic
     * @param {Json} data
     * @param {PublishOptions} [options]
     * @returns {Promise<number>}
     */
    publish(topic: string, data: Json, options?: PublishOptions): Promise<number>;
    /**
     * Who is subscribed to exactly `topic` now: [{id, name, connections}].
     * @param {string} topic
     * @returns {Promise<PresenceUser[]>}
     */
    presence(topic: string): Promise<PresenceUser[]>;
    /**
     * The broker's figures (needs an admin token).
     * @returns {Promise<Record<string, Json>>}
     */
    stats(): Promise<Record<string, Json>>;
}
export default BrokerClient;
export type JsonArray = Json[];
export type JsonObject = {
    [key: string]: Json;
};
/**
 * A JSON value, as `data` of a message.
 */
export type Json = null | boolean | number | string | JsonArray | JsonObject;
/**
 * A user as the broker names it.
 */
export type User = {
    id: string;
    name: string;
};
/**
 * A published message.
 */
export type Message<T = Json> = {
    topic: string;
    /**
     * Broker-wide sequence number, increasing.
     */
    seq: number;
    data: T;
    from: User;
    /**
     * The broker's receive time, ms since the Unix epoch.
     */
    ts: number;
};
/**
 * The broker's answer to a subscription (sent again on every resume).
 */
export type Subscribed = {
    seq: number;
    epoch: string;
    recovered: boolean;
    /**
     * True when this answers a resume after a reconnect or a page reload.
     */
    resumed: boolean;
};
/**
 * A resume that could not recover every missed message.
 */
export type Gap = {
    pattern: string;
    since: number | null;
    epoch: string | null;
    newEpoch: string;
    /**
     * True when the broker's history started over (e.g. a memory broker restarted).
     */
    epochChanged: boolean;
};
/**
 * A user joined or left a topic (subscriptions made with `presence: true`).
 */
export type PresenceEvent = {
    topic: string;
    user: User;
};
/**
 * A user subscribed to a topic, with how many of their connections are.
 */
export type PresenceUser = User & {
    connections: number;
};
/**
 * The client's state: "disconnected" while waiting to retry, "failed" when `client.error` stopped it.
 */
export type State = "idle" | "connecting" | "connected" | "disconnected" | "failed" | "closed";
/**
 * The "connecting" event: an attempt at `url` begins.
 */
export type ConnectingEvent = {
    url: string;
    attempt: number;
};
/**
 * The "connected" event: authenticated (`server` is the broker's broker/<version>).
 */
export type ConnectedEvent = {
    user: User;
    server: string;
    url: string;
};
/**
 * The "disconnected" event: a connection ended, or an attempt failed.
 */
export type DisconnectedEvent = {
    /**
     * The WebSocket close code (1006 when the connection failed; null when no socket was made).
     */
    code: number | null;
    reason: string;
    willReconnect: boolean;
    /**
     * Milliseconds until the next attempt, when reconnecting.
     */
    delay: number | null;
    /**
     * Why, when it is an error (ConnectionFailed, Unauthorized, ...).
     */
    error: BrokerError | null;
};
/**
 * What `sessionStorage` and `localStorage` offer, all the client needs.
 */
export type StorageLike = {
    getItem: (key: string) => string | null;
    setItem: (key: string, value: string) => void;
};
/**
 * A WebSocket, as far as the client uses one.
 */
export type WebSocketLike = {
    readyState: number;
    send: (data: string) => void;
    close: (code?: number, reason?: string) => void;
    onopen: ((ev: any) => any) | null;
    onmessage: ((ev: {
        data: any;
    }) => any) | null;
    onclose: ((ev: {
        code: number;
        reason: string;
    }) => any) | null;
    onerror: ((ev: any) => any) | null;
};
/**
 * A WebSocket class: the browser's, Node 22's global, or one passed in.
 */
export type WebSocketClass = new (url: string) => WebSocketLike;
/**
 * The options of `new BrokerClient(urls, options)`: a `token` or a `getToken` is needed.
 */
export type ClientOptions = {
    /**
     * A JWT. With `getToken` too, used first.
     */
    token?: string | null | undefined;
    /**
     * Returns a fresh JWT; called when there is none or it is about to expire, and before `exp` to refresh in place.
     */
    getToken?: (() => string | Promise<string>) | null | undefined;
    /**
     * Connect without a token: read the broker's public topics only (docs/protocol.md, "Public topics").
     */
    anonymous?: boolean | undefined;
    /**
     * The WebSocket class (default: the global one).
     */
    WebSocket?: WebSocketClass | null | undefined;
    /**
     * Keeps subscriptions and their positions across page reloads (e.g. `sessionStorage`).
     */
    storage?: StorageLike | null | undefined;
    /**
     * Prefix of the storage key (default "broker").
     */
    storageKey?: string | undefined;
    /**
     * Reconnect after a lost connection (default true).
     */
    reconnect?: boolean | undefined;
    /**
     * Give up (state "failed") when not connected again within this many ms (default: never).
     */
    reconnectTimeout?: number | null | undefined;
    /**
     * First backoff ceiling in ms (default 250); doubles per attempt up to `backoffMax` (10000).
     */
    backoffInitial?: number | undefined;
    backoffMax?: number | undefined;
    /**
     * Ms to wait for the broker's hello (default 10000).
     */
    connectTimeout?: number | undefined;
    /**
     * Ms to wait for an answer to a request, queued time included (default 30000; null: forever).
     */
    requestTimeout?: number | null | undefined;
    /**
     * Refresh the token at this fraction of its remaining lifetime (default 0.8).
     */
    refreshAt?: number | undefined;
    /**
     * How many recent seqs are remembered to drop duplicates (default 20000).
     */
    dedupeWindow?: number | undefined;
    /**
     * Messages kept for a subscription that has no listener or iterator yet (default 10000).
     */
    maxBuffered?: number | undefined;
};
/**
 * The options of `client.subscribe(pattern, options)`.
 */
export type SubscribeOptions = {
    /**
     * Replay the latest N retained messages first.
     */
    last?: number | undefined;
    /**
     * Replay the latest retained message of each matching topic first (a scoreboard's current scores).
     */
    latest?: boolean | undefined;
    /**
     * Replay every retained message after this seq first (with `epoch`, the history it was seen in).
     */
    since?: number | undefined;
    epoch?: string | undefined;
    /**
     * Ask for join/leave events on this exact topic.
     */
    presence?: boolean | undefined;
};
/**
 * The options of `client.publish(topic, data, options)`.
 */
export type PublishOptions = {
    /**
     * Idempotency key (1 to 128 characters); generated when absent.
     */
    key?: string | undefined;
    /**
     * Deliver the message to this connection too.
     */
    echo?: boolean | undefined;
};
/**
 * The client's events and what each passes to its listeners.
 */
export type ClientEvents = {
    connecting: ConnectingEvent;
    connected: ConnectedEvent;
    disconnected: DisconnectedEvent;
    state: State;
    message: Message;
    gap: Gap;
    join: PresenceEvent;
    leave: PresenceEvent;
    error: BrokerError;
};
/**
 * A subscription's events and what each passes to its listeners.
 */
export type SubscriptionEvents = {
    message: Message;
    subscribed: Subscribed;
    gap: Gap;
    join: PresenceEvent;
    leave: PresenceEvent;
    error: BrokerError;
};
