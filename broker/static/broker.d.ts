// Type declarations for broker.js, the broker's client library (docs/web.md).

/** WebSocket close codes of the protocol. */
export declare const CloseCode: Readonly<{
  NORMAL: 1000;
  GOING_AWAY: 1001;
  ABNORMAL: 1006;
  TOO_BIG: 1009;
  UNAUTHORIZED: 4001;
  TOKEN_EXPIRED: 4003;
  SLOW_CONSUMER: 4008;
}>;

/** A JSON value, as `data` of a message. */
export type Json = null | boolean | number | string | Json[] | { [key: string]: Json };

/** A user as the broker names it. */
export interface User {
  id: string;
  name: string;
}

/** A published message. */
export interface Message<T = Json> {
  topic: string;
  /** Broker-wide sequence number, increasing. */
  seq: number;
  data: T;
  from: User;
  /** The broker's receive time, ms since the Unix epoch. */
  ts: number;
}

/** The broker's answer to a subscription (sent again on every resume). */
export interface Subscribed {
  seq: number;
  epoch: string;
  recovered: boolean;
  /** True when this answers a resume after a reconnect or a page reload. */
  resumed: boolean;
}

/** A resume that could not recover every missed message. */
export interface Gap {
  pattern: string;
  since: number | null;
  epoch: string | null;
  newEpoch: string;
  /** True when the broker's history started over (e.g. a memory broker restarted). */
  epochChanged: boolean;
}

export interface PresenceEvent {
  topic: string;
  user: User;
}

export interface PresenceUser extends User {
  connections: number;
}

export type State = "idle" | "connecting" | "connected" | "disconnected" | "failed" | "closed";

export interface ConnectingEvent {
  url: string;
  attempt: number;
}

export interface ConnectedEvent {
  user: User;
  server: string;
  url: string;
}

export interface DisconnectedEvent {
  /** The WebSocket close code (1006 when the connection failed; null when no socket was made). */
  code: number | null;
  reason: string;
  willReconnect: boolean;
  /** Milliseconds until the next attempt, when reconnecting. */
  delay: number | null;
  /** Why, when it is an error (ConnectionFailed, Unauthorized, ...). */
  error: BrokerError | null;
}

/** What `sessionStorage` and `localStorage` offer, all the client needs. */
export interface StorageLike {
  getItem(key: string): string | null;
  setItem(key: string, value: string): void;
}

/** A WebSocket class: the browser's, Node 22's global, or one passed in. */
export interface WebSocketLike {
  readonly readyState: number;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  onopen: ((ev: any) => any) | null;
  onmessage: ((ev: { data: any }) => any) | null;
  onclose: ((ev: { code: number; reason: string }) => any) | null;
  onerror: ((ev: any) => any) | null;
}
export type WebSocketClass = new (url: string) => WebSocketLike;

export interface ClientOptions {
  /** A JWT. With `getToken` too, used first. */
  token?: string;
  /** Returns a fresh JWT; called when there is none or it is about to expire, and before `exp` to refresh in place. */
  getToken?: () => string | Promise<string>;
  /** The WebSocket class (default: the global one). */
  WebSocket?: WebSocketClass;
  /** Keeps subscriptions and their positions across page reloads (e.g. `sessionStorage`). */
  storage?: StorageLike | null;
  /** Prefix of the storage key (default "broker"). */
  storageKey?: string;
  /** Reconnect after a lost connection (default true). */
  reconnect?: boolean;
  /** Give up (state "failed") when not connected again within this many ms (default: never). */
  reconnectTimeout?: number | null;
  /** First backoff ceiling in ms (default 250); doubles per attempt up to `backoffMax` (10000). */
  backoffInitial?: number;
  backoffMax?: number;
  /** Ms to wait for the broker's hello (default 10000). */
  connectTimeout?: number;
  /** Ms to wait for an answer to a request, queued time included (default 30000; null: forever). */
  requestTimeout?: number | null;
  /** Refresh the token at this fraction of its remaining lifetime (default 0.8). */
  refreshAt?: number;
  /** How many recent seqs are remembered to drop duplicates (default 20000). */
  dedupeWindow?: number;
  /** Messages kept for a subscription that has no listener or iterator yet (default 10000). */
  maxBuffered?: number;
}

export interface SubscribeOptions {
  /** Replay the latest N retained messages first. */
  last?: number;
  /** Replay every retained message after this seq first (with `epoch`, the history it was seen in). */
  since?: number;
  epoch?: string;
  /** Ask for join/leave events on this exact topic. */
  presence?: boolean;
}

export interface PublishOptions {
  /** Idempotency key (1 to 128 characters); generated when absent. */
  key?: string;
  /** Deliver the message to this connection too. */
  echo?: boolean;
}

export interface ClientEvents {
  connecting: ConnectingEvent;
  connected: ConnectedEvent;
  disconnected: DisconnectedEvent;
  state: State;
  message: Message;
  gap: Gap;
  join: PresenceEvent;
  leave: PresenceEvent;
  error: BrokerError;
}

export interface SubscriptionEvents {
  message: Message;
  subscribed: Subscribed;
  gap: Gap;
  join: PresenceEvent;
  leave: PresenceEvent;
  error: BrokerError;
}

/** A minimal event emitter. */
export declare class Emitter<Events> {
  /** Call `listener` on each `event`; returns a function that stops it. */
  on<K extends keyof Events>(event: K, listener: (arg: Events[K]) => void): () => void;
  once<K extends keyof Events>(event: K, listener: (arg: Events[K]) => void): () => void;
  off<K extends keyof Events>(event: K, listener: (arg: Events[K]) => void): void;
  listenerCount<K extends keyof Events>(event: K): number;
}

/** One subscription; iterate it with `for await (const msg of sub)`. */
export declare class Subscription extends Emitter<SubscriptionEvents> implements AsyncIterable<Message> {
  readonly client: BrokerClient;
  readonly pattern: string;
  readonly presence: boolean;
  /** The first answer of the broker; rejects when it refuses the subscription. */
  readonly ready: Promise<Subscribed>;
  /** Where a resume starts. */
  readonly position: { since: number | null; epoch: string | null };
  readonly ended: boolean;
  /** "pending" (waiting for the broker's answer or a connection), "active" or "ended". */
  readonly state: "pending" | "active" | "ended";
  unsubscribe(): Promise<void>;
  [Symbol.asyncIterator](): AsyncIterator<Message>;
}

export declare class BrokerClient extends Emitter<ClientEvents> {
  /** `urls`: one ws(s):// URL or a list tried in turn; omitted in a page: ws(s)://<this host>/ws. */
  constructor(urls?: string | string[] | null, options?: ClientOptions);
  readonly urls: string[];
  readonly options: Required<ClientOptions>;
  readonly state: State;
  readonly connected: boolean;
  readonly user: User | null;
  readonly server: string | null;
  readonly url: string | null;
  readonly epoch: string | null;
  readonly reconnects: number;
  /** The error that stopped the client (state "failed"). */
  readonly error: BrokerError | null;
  readonly subscriptions: Map<string, Subscription>;
  /** Resolves once connected (it keeps reconnecting meanwhile; while waiting to retry, it tries at once); rejects when the client fails. */
  connect(): Promise<void>;
  close(): void;
  subscribe(pattern: string, options?: SubscribeOptions): Subscription;
  /** Resolves to the message's seq once recorded. */
  publish(topic: string, data: Json, options?: PublishOptions): Promise<number>;
  presence(topic: string): Promise<PresenceUser[]>;
  stats(): Promise<Record<string, Json>>;
}

export default BrokerClient;

/** Base class: `code` is the protocol error code or a client-side one. */
export declare class BrokerError extends Error {
  constructor(message?: string, options?: { requestId?: number });
  code: string;
  requestId: number | undefined;
}
export declare class BadRequest extends BrokerError {}
export declare class Unauthorized extends BrokerError {}
export declare class TokenExpired extends Unauthorized {}
export declare class Forbidden extends BrokerError {}
export declare class RateLimited extends BrokerError {}
export declare class Unavailable extends BrokerError {}
export declare class InternalError extends BrokerError {}
export declare class ConnectionFailed extends BrokerError {
  /** True when the broker answered HTTP but refused the WebSocket handshake (origin check, capacity). */
  handshakeRefused: boolean;
}
export declare class ConnectionLost extends BrokerError {}
export declare class RequestTimeout extends BrokerError {}

export declare function errorForCode(code: string, message?: string, requestId?: number): BrokerError;
export declare function matches(pattern: string, topic: string): boolean;
export declare function decodeToken(token: string): Record<string, unknown> | null;
