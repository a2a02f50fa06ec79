// Driven by tests/test_js_token_expiry.py: how broker.js tells an expired token from a
// refused one, against a real broker.
//   node [--experimental-websocket] expiry.mjs URL FORGED_TOKEN EXPIRED_TOKEN VALID_TOKEN
// FORGED_TOKEN is refused with a reason that contains the word "expired" although its `exp`
// is an hour away. Prints one JSON object with what it observed.
import { BrokerClient, TokenExpired, Unauthorized } from "../../broker/static/broker.js";

const [url, forged, expired, valid] = process.argv.slice(2);
const result = {};

/** Wait until `done()` or `ms` passed. */
async function until(done, ms) {
  const end = Date.now() + ms;
  while (!done() && Date.now() < end) await new Promise((r) => setTimeout(r, 20));
}

function describe(err) {
  return err ? { name: err.name, message: err.message, unauthorized: err instanceof Unauthorized, expired: err instanceof TokenExpired } : null;
}

// 1. A refused token whose reason happens to say "expired" is not an expired token.
{
  const client = new BrokerClient(url, { token: forged });
  result.forged = await client.connect().then(() => null, describe);
  result.forgedState = client.state;
  client.close();
}

// 2. getToken that hands out that token: one refusal stops the client; no retrying forever.
{
  let calls = 0;
  const client = new BrokerClient(url, {
    getToken: () => {
      calls += 1;
      return forged;
    },
    backoffInitial: 50,
    backoffMax: 100,
  });
  client.connect().catch(() => {});
  await until(() => client.state === "failed", 3000);
  result.forgedGetToken = { calls, state: client.state, error: describe(client.error) };
  client.close();
}

// 3. A token whose own `exp` has passed is an expired token, whatever the words.
{
  const client = new BrokerClient(url, { token: expired });
  result.expired = await client.connect().then(() => null, describe);
  client.close();
}

// 4. Our clock two minutes behind the broker's: the held token looks valid here but the broker
// says it expired; one fresh token from getToken and the client connects.
{
  const realNow = Date.now;
  Date.now = () => realNow() - 120_000;
  try {
    let calls = 0;
    const client = new BrokerClient(url, {
      token: expired,
      getToken: () => {
        calls += 1;
        return valid;
      },
      backoffInitial: 50,
    });
    const connected = client.connect().then(() => true, describe);
    await until(() => client.state === "connected" || client.state === "failed", 5000);
    result.skewed = { connected: await Promise.race([connected, "pending"]), calls, state: client.state };
    client.close();
  } finally {
    Date.now = realNow;
  }
}

console.log(JSON.stringify(result));
process.exit(0);
