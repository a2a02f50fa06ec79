#!/usr/bin/env bash
# Three broker nodes on one Redis, on this machine. Ctrl-C stops everything it started.
#
#   examples/cluster/run.sh                 # starts its own redis-server on port 6390
#   REDIS_URL=redis://10.0.0.5:6379/0 examples/cluster/run.sh   # or uses yours
#
# Nodes: ws://127.0.0.1:8765/ws, :8766, :8767 (BASE_PORT and REDIS_PORT move them). They share BROKER_SECRET (tokens from
# `broker token` made with the same secret work on every node).
set -euo pipefail
cd "$(dirname "$0")/../.."

export BROKER_SECRET="${BROKER_SECRET:-cluster-example-secret-change-me-0123456789}"
REDIS_PORT="${REDIS_PORT:-6390}"
BASE_PORT="${BASE_PORT:-8765}"
pids=()
stop() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap stop EXIT INT TERM

if [[ -z "${REDIS_URL:-}" ]]; then
    # No persistence here: history lives as long as this redis-server. See docs/cluster.md
    # ("Durability") for the appendonly settings to use in production.
    redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
        --loglevel warning &
    pids+=($!)
    REDIS_URL="redis://127.0.0.1:$REDIS_PORT/0"
    until redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1; do sleep 0.1; done
fi

for port in "$BASE_PORT" $((BASE_PORT + 1)) $((BASE_PORT + 2)); do
    python -m broker.cli serve --port "$port" --redis "$REDIS_URL" --log-format json \
        2> >(sed -u "s/^/[node $port] /" >&2) &
    pids+=($!)
done
echo "three nodes on $REDIS_URL: ws://127.0.0.1:$BASE_PORT/ws and the next two ports (Ctrl-C stops)" >&2
wait
