#!/usr/bin/env bash
# Coffer local demo: builds the binaries, starts a receiver on loopback with its backup tree
# in ./demo/receiver, and an agent watching ./demo/watched (created if missing). Runs until
# Ctrl-C; run it again to pick up where it left off.
#
# Environment: COFFER_DEMO_DIR (default ./demo), COFFER_DEMO_PORT (default 7797).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DEMO=${COFFER_DEMO_DIR:-$ROOT/demo}
PORT=${COFFER_DEMO_PORT:-7797}

if ! command -v cargo >/dev/null; then
  echo "cargo is needed: install Rust from https://rustup.rs" >&2; exit 1
fi
echo "== building (release)"
cargo build --release --locked -q -p coffer-agent -p coffer-receiver
TARGET=${CARGO_TARGET_DIR:-target}
case $TARGET in /*) ;; *) TARGET=$ROOT/$TARGET ;; esac
BIN=$TARGET/release
AGENT=$BIN/coffer-agent
RECV=$BIN/coffer-receiver

mkdir -p "$DEMO"
DEMO=$(cd "$DEMO" && pwd)
PASSFILE=$DEMO/passphrase
if [ ! -f "$PASSFILE" ]; then
  umask 077
  head -c 24 /dev/urandom | base64 > "$PASSFILE"
  umask 022
  echo "== generated a demo passphrase in $PASSFILE (keep it: it is the only way to your backups)"
fi

if [ ! -f "$DEMO/receiver/receiver.toml" ]; then
  echo "== initializing the receiver in $DEMO/receiver"
  "$RECV" init --root "$DEMO/receiver" --listen "127.0.0.1:$PORT" > "$DEMO/receiver.pub"
fi
RKEY=$(cat "$DEMO/receiver.pub")

"$RECV" serve --root "$DEMO/receiver" --listen "127.0.0.1:$PORT" > "$DEMO/receiver.out" 2> "$DEMO/receiver.log" &
RPID=$!
trap 'kill $RPID ${APID:-} 2>/dev/null; wait 2>/dev/null; echo; echo "stopped (state kept in $DEMO)"' EXIT
for _ in $(seq 100); do grep -q "listening on" "$DEMO/receiver.out" 2>/dev/null && break; sleep 0.1; done
grep -q "listening on" "$DEMO/receiver.out" || { echo "receiver failed to start:"; cat "$DEMO/receiver.log"; exit 1; }

if [ ! -f "$DEMO/agent.toml" ]; then
  echo "== initializing the agent (watching $DEMO/watched)"
  AKEY=$(env -u COFFER_PASSPHRASE "$AGENT" init --config "$DEMO/agent.toml" --receiver "127.0.0.1:$PORT" \
      --receiver-key "$RKEY" --name demo --watch "$DEMO/watched" --passphrase-file "$PASSFILE" 2>/dev/null)
  "$RECV" authorize --root "$DEMO/receiver" --name demo "$AKEY"
fi

"$AGENT" run --config "$DEMO/agent.toml" 2> "$DEMO/agent.log" &
APID=$!
for _ in $(seq 100); do
  "$AGENT" status --config "$DEMO/agent.toml" --json 2>/dev/null | grep -q '"running":true' && break; sleep 0.1
done

# The commands suggested below read the config from COFFER_CONFIG (the agent's --config
# falls back to it) and find the binaries on PATH, so they are short.
CONFIG_Q=$(printf '%q' "$DEMO/agent.toml")
BIN_Q=$(printf '%q' "$BIN")
cat <<MSG

Coffer is running: receiver on 127.0.0.1:$PORT (tree: $DEMO/receiver), agent watching $DEMO/watched.
Logs: $DEMO/receiver.log, $DEMO/agent.log

Try, in another terminal:
  export COFFER_CONFIG=$CONFIG_Q
  export PATH=$BIN_Q:\$PATH
  echo hello > $DEMO/watched/hello.txt
  coffer-agent status
  coffer-agent status $DEMO/watched/hello.txt
  coffer-agent ls
  coffer-agent restore --to /tmp/coffer-restore
  coffer-receiver status --root $DEMO/receiver

Press Ctrl-C to stop both.
MSG
wait $APID
