// The Socket.IO tutorial's chat server, as a benchmark peer for benchmarks/compare.py.
//
// JWT in the handshake (`auth: {token}`), verified with HS256 and the shared secret;
// the user's {id, name} comes from the token. Events: `join` (room), `leave` (room),
// `message` ({room, text}) relayed with `socket.to(room).emit` (not back to the sender)
// together with the sender's id and name. An acknowledgement callback, when the client
// asks for one, is answered once the relay is done.
//
//   node socketio-server.js --port 3000 --secret S      (listens on 127.0.0.1 only)
"use strict";

const http = require("http");
const { Server } = require("socket.io");
const jwt = require("jsonwebtoken");

function arg(name, fallback) {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? process.argv[i + 1] : process.env[name.toUpperCase()] ?? fallback;
}

const port = Number(arg("port", 3000));
const secret = arg("secret", "secret");

const httpServer = http.createServer();
const io = new Server(httpServer, { cors: { origin: "*" } });

io.use((socket, next) => {
  const token = socket.handshake.auth && socket.handshake.auth.token;
  if (!token) return next(new Error("missing token"));
  try {
    const claims = jwt.verify(token, secret, { algorithms: ["HS256"] });
    socket.data.user = { id: String(claims.id ?? claims.sub), name: claims.name };
    next();
  } catch (err) {
    next(new Error("invalid token"));
  }
});

io.on("connection", (socket) => {
  const user = socket.data.user;
  socket.on("join", (room, ack) => {
    socket.join(room);
    if (typeof ack === "function") ack({ ok: true });
  });
  socket.on("leave", (room, ack) => {
    socket.leave(room);
    if (typeof ack === "function") ack({ ok: true });
  });
  socket.on("message", (msg, ack) => {
    socket.to(msg.room).emit("message", { room: msg.room, text: msg.text, id: user.id, name: user.name });
    if (typeof ack === "function") ack({ ok: true });
  });
});

httpServer.listen(port, "127.0.0.1", () => {
  console.log(`listening on 127.0.0.1:${port}`);
});
