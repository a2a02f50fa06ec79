// Driven by tests/test_js_client.py: broker.js in Node against a real broker that is
// restarted in the middle. One client subscribes, another publishes COUNT messages (half
// before the restart, half while it happens); every line on stdout is one JSON object.
//
//   node [--experimental-websocket] resume.mjs URL SUB_TOKEN PUB_TOKEN COUNT
// stdout: {"ready": ...}, {"restart": true} (the driver stops the broker and writes a line),
// {"queued": true} (the driver starts the broker again and writes a line), then
// {"done": ...} with what was received and acknowledged.
import { createInterface } from "node:readline";
import { BrokerClient } from "../../broker/static/broker.js";

const [url, subToken, pubToken, countText] = process.argv.slice(2);
const count = Number(countText);
const out = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");
const stdin = createInterface({ input: process.stdin });
const nextLine = () => new Promise((resolve) => stdin.once("line", resolve));

const fast = { backoffInitial: 50, backoffMax: 500 };
const subscriber = new BrokerClient(url, { token: subToken, ...fast });
const publisher = new BrokerClient([url], { token: pubToken, ...fast });
const events = [];
subscriber.on("disconnected", (e) => events.push({ who: "sub", code: e.code, willReconnect: e.willReconnect }));
publisher.on("disconnected", (e) => events.push({ who: "pub", code: e.code, willReconnect: e.willReconnect }));
subscriber.on("gap", (g) => events.push({ who: "sub", gap: g }));

const received = [];
let resolveAll;
const all = new Promise((resolve) => (resolveAll = resolve));
const sub = subscriber.subscribe("feed/#");
(async () => {
  for await (const msg of sub) {
    received.push({ seq: msg.seq, data: msg.data, topic: msg.topic, from: msg.from.id });
    if (received.length >= count) resolveAll();
  }
})();

await subscriber.connect();
const first = await sub.ready;
await publisher.connect();
out({ ready: true, epoch: first.epoch, recovered: first.recovered });

const half = Math.floor(count / 2);
const acked = [];
for (let i = 1; i <= half; i++) acked.push(publisher.publish(`feed/${i % 3}`, i));
await Promise.all(acked);

out({ restart: true });
await nextLine(); // the broker is down now
// The second half is published while the broker is away: queued, then sent with its key
// once the publisher is back, and acknowledged once.
for (let i = half + 1; i <= count; i++) acked.push(publisher.publish(`feed/${i % 3}`, i));
out({ queued: true });
await nextLine(); // the broker is up again
const seqs = await Promise.all(acked);
const timer = setTimeout(() => {
  out({ timeout: true, received: received.length, events });
  process.exit(3);
}, 15000);
await all;
clearTimeout(timer);
out({
  done: true,
  received,
  acked: seqs,
  subscriberReconnects: subscriber.reconnects,
  publisherReconnects: publisher.reconnects,
  position: sub.position,
  events,
});
subscriber.close();
publisher.close();
stdin.close();
