// Driven by tests/test_js_client.py: the library's API in Node against a real broker.
//   node [--experimental-websocket] api.mjs URL ALICE_TOKEN BOB_TOKEN EXPIRED_TOKEN CLOSED_URL
// prints one JSON object with what it observed.
import {
  BrokerClient,
  BrokerError,
  ConnectionFailed,
  Forbidden,
  BadRequest,
  TokenExpired,
} from "../../broker/static/broker.js";

const [url, aliceToken, bobToken, expiredToken, closedUrl] = process.argv.slice(2);
const result = {};

const alice = new BrokerClient(url, { token: aliceToken });
const bob = new BrokerClient(url, { token: bobToken });
const states = [];
alice.on("connecting", () => states.push("connecting"));
alice.on("connected", ({ user }) => states.push(`connected:${user.id}:${user.name}`));
await Promise.all([alice.connect(), bob.connect()]);

// A replay of the last 2, then live, via an iterator; pattern and presence.
for (const score of ["0-0", "1-0", "1-1"]) await bob.publish("scores/uk", score);
const scores = alice.subscribe("scores/+", { last: 2 });
const room = alice.subscribe("room/1", { presence: true });
const joins = [];
room.on("join", (e) => joins.push(e.user.id));
result.ready = await scores.ready;
await room.ready;
const bobRoom = bob.subscribe("room/1");
await bobRoom.ready;
result.presence = await bob.presence("room/1");
const live = await bob.publish("scores/uk", "2-1", { key: "api-test-key-1" });
const got = [];
for await (const m of scores) {
  got.push([m.seq, m.topic, m.data, m.from.name]);
  if (got.length === 3) break;
}
result.got = got;
result.live = live;
result.joins = joins;

// Typed errors per error code.
const errorOf = async (promise) => {
  try {
    await promise;
    return null;
  } catch (e) {
    return { name: e.name, code: e.code, broker: e instanceof BrokerError, message: e.message };
  }
};
result.reserved = await errorOf(bob.publish("$sys/x", 1));
result.reservedIsForbidden = (await bob.publish("$sys/x", 1).catch((e) => e)) instanceof Forbidden;
result.badTopic = await errorOf(bob.publish("a/+", 1));
result.badIsBadRequest = (await bob.publish("a/+", 1).catch((e) => e)) instanceof BadRequest;
const inbox = bob.subscribe("user/1");
result.inbox = await errorOf(inbox.ready);
result.inboxEnded = inbox.ended;

// A refused token stops the client and says why.
const expired = new BrokerClient(url, { token: expiredToken });
const stops = [];
expired.on("disconnected", (e) => stops.push({ code: e.code, willReconnect: e.willReconnect, reason: e.reason }));
result.expired = await errorOf(expired.connect());
result.expiredIsTokenExpired = expired.error instanceof TokenExpired;
result.expiredState = expired.state;
result.expiredEvents = stops;

// Nothing listening: fails fast with reconnect: false.
const nowhere = new BrokerClient(closedUrl, { token: aliceToken, reconnect: false });
result.nowhere = await errorOf(nowhere.connect());
result.nowhereIsConnectionFailed = nowhere.error instanceof ConnectionFailed;

// With storage, a new client (a reloaded page) resumes the subscriptions where they were.
const store = new Map();
const storage = { getItem: (k) => store.get(k) ?? null, setItem: (k, v) => store.set(k, v) };
const first = new BrokerClient(url, { token: aliceToken, storage });
const kept = first.subscribe("stored/#");
await first.connect();
await kept.ready;
await bob.publish("stored/a", "one");
for await (const m of kept) break; // eslint-disable-line no-unused-vars
first.close();
await bob.publish("stored/a", "two");
await bob.publish("stored/b", "three");
const second = new BrokerClient(url, { token: aliceToken, storage });
result.restored = [...second.subscriptions.keys()];
const again = [];
let resumed = null;
second.subscriptions.get("stored/#").on("subscribed", (info) => (resumed = info));
await new Promise((resolve) => {
  second.on("message", (m) => {
    again.push(m.data);
    if (again.length === 2) resolve();
  });
  second.connect();
});
result.resumedAfterRestore = { messages: again, recovered: resumed.recovered, resumed: resumed.resumed };
second.close();

result.states = states;
alice.close();
bob.close();
result.afterClose = await errorOf(alice.publish("scores/uk", "x"));
process.stdout.write(JSON.stringify(result) + "\n");
