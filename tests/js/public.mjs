// Driven by tests/test_public_js.py: `latest` and an anonymous connection in Node.
//   node [--experimental-websocket] public.mjs URL PUBLISHER_TOKEN
// prints one JSON object with what it observed.
import { BrokerClient } from "../../broker/static/broker.js";

const [url, publisherToken] = process.argv.slice(2);
const result = {};

const publisher = new BrokerClient(url, { token: publisherToken });
await publisher.connect();
for (const [topic, score] of [["scores/a", "0-0"], ["scores/b", "1-0"], ["scores/a", "1-0"]]) {
  await publisher.publish(topic, score);
}

const viewer = new BrokerClient(url, { anonymous: true });
await viewer.connect();
result.user = viewer.user;
const scores = viewer.subscribe("scores/#", { latest: true });
result.ready = await scores.ready;
const got = [];
for await (const m of scores) {
  got.push([m.topic, m.data]);
  if (got.length === 2) {
    await publisher.publish("scores/b", "2-0");
  }
  if (got.length === 3) break;
}
result.got = got;
try {
  await viewer.publish("scores/a", "hack");
} catch (err) {
  result.publish = err.name;
}
const chat = viewer.subscribe("chat");
try {
  await chat.ready;
} catch (err) {
  result.chat = err.name;
}
try {
  viewer.subscribe("x", { latest: true, last: 2 });
} catch (err) {
  result.both = err.name;
}
await viewer.close();
await publisher.close();
console.log(JSON.stringify(result));
