// Type-checked by `tsc --noEmit` (tests/test_js_client.py): the declarations fit real use.
import BrokerClient, {
  BrokerError,
  ConnectionFailed,
  Forbidden,
  type DisconnectedEvent,
  type Gap,
  type Message,
  type Subscription,
  TokenExpired,
} from "../../broker/static/broker.js";

// No DOM or Node typings: broker.d.ts must stand on its own.
declare const console: { log(...args: unknown[]): void };

async function main(): Promise<void> {
  const client = new BrokerClient(["ws://127.0.0.1:8765/ws", "ws://127.0.0.1:8766/ws"], {
    getToken: async () => "a.jwt.token",
    storage: null,
    backoffMax: 5000,
  });
  client.on("disconnected", (e: DisconnectedEvent) => {
    const code: number | null = e.code;
    if (e.error instanceof ConnectionFailed && e.error.handshakeRefused) console.log(code, e.reason);
  });
  client.on("connected", ({ user, server }) => console.log(user.id, user.name, server));
  client.on("gap", (gap: Gap) => console.log(gap.pattern, gap.since, gap.epochChanged));
  await client.connect();

  const sub: Subscription = client.subscribe("scores/#", { last: 10, presence: false });
  const viewer = new BrokerClient("ws://127.0.0.1:8765/ws", { anonymous: true });
  const board: Subscription = viewer.subscribe("scores/#", { latest: true });
  board.on("message", (m: Message) => console.log(m.topic, m.data));
  const off = sub.on("message", (m: Message) => console.log(m.seq, m.topic, m.from.name, m.data));
  off();
  const first = await sub.ready;
  const recovered: boolean = first.recovered;
  console.log(recovered, first.epoch.toUpperCase());
  for await (const m of sub) {
    const seq: number = m.seq;
    console.log(seq);
    break;
  }
  await sub.unsubscribe();

  try {
    const seq: number = await client.publish("scores/uk", { home: 2, away: 1 }, { key: "k1" });
    console.log(seq + 1);
  } catch (err) {
    if (err instanceof Forbidden || err instanceof TokenExpired) console.log(err.code);
    else if (err instanceof BrokerError) console.log(err.message, err.requestId);
  }
  const users = await client.presence("chat/lobby");
  console.log(users.map((u) => `${u.name} x${u.connections}`));
  client.close();
}

void main();
