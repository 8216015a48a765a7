#!/usr/bin/env bash
# pop3d side by side with Dovecot (Debian's dovecot-pop3d), same maildrops, same generator (`pop3d bench`).
#
#   benchmarks/compare.sh [WORKDIR]           (as root: installs dovecot-pop3d, runs it as user `mail`)
#
# Environment: DURATION (s per run, 10), CONCURRENCY (clients, 50), PROCS (generator processes, 1),
# WORKERS (pop3d workers and bare-responder processes, nproc), IDLE (sessions held against both, 1000),
# IDLE_BIG (held against pop3d alone, 10000; 0 skips), IDLE_TLS (TLS sessions held against pop3d alone,
# 20000; 0 skips), HUGE (messages of the one-user Maildir for the second-login test, 100000; 0 skips),
# HASHES (1: the {SHA512-CRYPT} and {ARGON2ID} poll cases; 0 skips), TLS_KEY (ec: ECDSA P-256, or rsa:
# RSA 2048, the server key of both servers).
#
# Both servers read the same passwd-file (equal hashing cost: {PLAIN} secrets, or the same {SHA512-CRYPT}
# (5000 rounds) and {ARGON2ID} (m=64 MiB, t=3, p=1) hashes, which `pop3d mkmaildrops --scheme` makes as
# `doveadm pw` does), listen on loopback in cleartext and implicit TLS (RFC 8314) with the same key and
# certificate, and get their own copy of the maildrops. Dovecot runs in its high-performance login mode
# (`service pop3-login { service_count = 0 }`, one login process per CPU) with its auth cache on
# (`auth_cache_size`); pop3d runs with its defaults. The hashed cases measure repeat logins: a warm-up
# logs every user in once first, since the first login per user pays the full hash on both servers.
# benchmarks/bare_responder.py (a uvloop responder with no POP3 care, WORKERS processes) runs beside them as
# the ceiling: every run reports pop3d's ratio to it in cleartext and over TLS. Results (JSON per run and
# ratio tables) land in WORKDIR/results. Not part of CI or the tests: it takes minutes and needs root.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
W=${1:-/tmp/pop3d-compare}
PY=${PYTHON:-python3}
DURATION=${DURATION:-10}
CONCURRENCY=${CONCURRENCY:-50}
PROCS=${PROCS:-1}
WORKERS=${WORKERS:-$(nproc)}
IDLE=${IDLE:-1000}
IDLE_BIG=${IDLE_BIG:-10000}
HUGE=${HUGE:-100000}
IDLE_TLS=${IDLE_TLS:-20000}
HASHES=${HASHES:-1}
TLS_KEY=${TLS_KEY:-ec}
P_PORT=${P_PORT:-11110}
D_PORT=${D_PORT:-11111}
B_PORT=${B_PORT:-11112}
P_TLS_PORT=${P_TLS_PORT:-11995}
D_TLS_PORT=${D_TLS_PORT:-11996}
B_TLS_PORT=${B_TLS_PORT:-11997}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
pop3d() { "$PY" -m pop3d "$@"; }

# ---- Dovecot -----------------------------------------------------------------------------------------
# shellcheck source=benchmarks/dovecot.sh
. "$ROOT/benchmarks/dovecot.sh"
dovecot_install

rm -rf "$W"
mkdir -p "$W/results"
USERS_N=$(( IDLE_BIG > IDLE ? IDLE_BIG : IDLE ))
USERS_N=$(( USERS_N > IDLE_TLS ? USERS_N : IDLE_TLS ))
USERS_N=$(( USERS_N > CONCURRENCY ? USERS_N : CONCURRENCY ))
echo "== maildrops in $W (users: $USERS_N x 10 x 4 KiB, $CONCURRENCY x 10 x 100 KiB, 1 x $HUGE x 1 KiB)"
pop3d mkmaildrops "$W/small" --users "$USERS_N" --messages 10 --size 4k >/dev/null
pop3d mkmaildrops "$W/large" --users "$CONCURRENCY" --messages 10 --size 100k >/dev/null
if [ "$HUGE" -gt 0 ]; then pop3d mkmaildrops "$W/huge" --users 1 --messages "$HUGE" --size 1k >/dev/null; fi
if [ "$HASHES" -gt 0 ]; then
  echo "== $CONCURRENCY users with {SHA512-CRYPT} and with {ARGON2ID} passwords"
  pop3d mkmaildrops "$W/sha512" --users "$CONCURRENCY" --messages 10 --size 4k --scheme SHA512-CRYPT >/dev/null
  pop3d mkmaildrops "$W/argon2" --users "$CONCURRENCY" --messages 10 --size 4k --scheme ARGON2ID >/dev/null
fi

# one key and certificate for all three servers (a load test: the generator does not verify it)
mkdir -p "$W/tls"
case "$TLS_KEY" in
  rsa) KEYOPT=(-newkey rsa:2048) ;;
  *) KEYOPT=(-newkey ec -pkeyopt ec_paramgen_curve:P-256) ;;
esac
openssl req -x509 "${KEYOPT[@]}" -nodes -days 2 -subj /CN=localhost -addext subjectAltName=IP:127.0.0.1,DNS:localhost \
  -keyout "$W/tls/key.pem" -out "$W/tls/cert.pem" 2>/dev/null
chmod 644 "$W/tls/key.pem"

for s in small large huge sha512 argon2; do
  [ -d "$W/$s" ] || continue
  mkdir -p "$W/dovecot/$s"
  cp -a "$W/$s/mail" "$W/dovecot/$s/mail"
  chown -R mail:mail "$W/dovecot/$s/mail"
done

# one Dovecot, one pop3d and one bare responder per maildrop set, so every set is served the same way
start_servers() {  # $1 = set name; sets P_PID, D_PID, B_PID
  local set=$1
  local d="$W/dovecot/$set"
  dovecot_conf "$d" "$W/$set/passwd" "$D_PORT" "$D_TLS_PORT" "$W/tls/cert.pem" "$W/tls/key.pem"
  dovecot -c "$d/dovecot.conf" -F >"$d/stdout.log" 2>&1 &
  D_PID=$!
  sed -e "s/127.0.0.1:1110/127.0.0.1:$P_PORT/" \
    -e "s/^\[server\]/[server]\nworkers = $WORKERS\nbacklog = 4096\ntls_listen = [\"127.0.0.1:$P_TLS_PORT\"]/" \
    "$W/$set/pop3d.toml" > "$W/$set/pop3d-bench.toml"
  printf '[tls]\ncert = "%s"\nkey = "%s"\n' "$W/tls/cert.pem" "$W/tls/key.pem" >> "$W/$set/pop3d-bench.toml"
  "$PY" -m pop3d serve --config "$W/$set/pop3d-bench.toml" >"$W/$set/pop3d.log" 2>&1 &
  P_PID=$!
  "$PY" "$ROOT/benchmarks/bare_responder.py" --passwd "$W/$set/passwd" --location "$W/$set/mail/{user}/Maildir" \
    --listen "127.0.0.1:$B_PORT" --tls-listen "127.0.0.1:$B_TLS_PORT" --cert "$W/tls/cert.pem" \
    --key "$W/tls/key.pem" --procs "$WORKERS" >"$W/$set/bare.log" 2>&1 &
  B_PID=$!
  for port in $P_PORT $D_PORT $B_PORT $P_TLS_PORT $D_TLS_PORT $B_TLS_PORT; do
    for _ in $(seq 100); do
      (echo > "/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
      sleep 0.1
    done
  done
  sleep 1
}

stop_servers() {
  kill -TERM "$P_PID" "$B_PID" 2>/dev/null || true
  doveadm -c "$W/dovecot/$1/dovecot.conf" stop 2>/dev/null || kill -TERM "$D_PID" 2>/dev/null || true
  wait "$P_PID" 2>/dev/null || true
  wait "$B_PID" 2>/dev/null || true
  wait "$D_PID" 2>/dev/null || true
}

P_PID=""
D_PID=""
B_PID=""
cleanup() { kill -TERM $P_PID $D_PID $B_PID 2>/dev/null || true; }
trap cleanup EXIT

SERVERS="pop3d dovecot"
run_pair() {  # name set scenario concurrency extra-args... (--tls: the implicit-TLS ports); servers: $SERVERS
  local name=$1 set=$2 scenario=$3 conc=$4
  shift 4
  local tls=""
  case " $* " in *" --tls "*) tls=1 ;; esac
  for server in $SERVERS; do
    local port=$P_PORT pid=$P_PID
    [ "$server" = dovecot ] && port=$D_PORT && pid=$D_PID
    [ "$server" = bare ] && port=$B_PORT && pid=$B_PID
    if [ -n "$tls" ]; then
      port=$P_TLS_PORT
      [ "$server" = dovecot ] && port=$D_TLS_PORT
      [ "$server" = bare ] && port=$B_TLS_PORT
    fi
    echo "-- $name: $server" >&2
    pop3d bench "127.0.0.1:$port" --report-only --users "$W/$set/users.txt" --scenario "$scenario" --concurrency "$conc" \
      --procs "$PROCS" --duration "$DURATION" --server-pid "$pid" --json "$@" > "$W/results/$name-$server.json" \
      || echo "   (no session completed)" >&2
  done
}

echo "== $(uname -srm), $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "== pop3d $(pop3d --version | cut -d' ' -f2) (workers=$WORKERS) vs Dovecot $(dovecot --version | cut -d' ' -f1)" \
  "vs bare responder ($WORKERS processes); TLS key: $TLS_KEY"

warm_up() {  # set port... : every user of the set logs in once (closed loop: each client finishes a session)
  local set=$1
  shift
  for port in "$@"; do
    pop3d bench "127.0.0.1:$port" --report-only --users "$W/$set/users.txt" --scenario poll -c "$CONCURRENCY" \
      -d "${WARM:-2}" --timeout 300 --json >/dev/null || true
  done
}

start_servers small
# warm-up: first logins build caches on both sides (pop3d's size cache, Dovecot's indexes)
warm_up small "$P_PORT" "$D_PORT" "$B_PORT"
SERVERS="pop3d dovecot bare"
run_pair poll small poll "$CONCURRENCY"
run_pair poll-tls small poll "$CONCURRENCY" --tls
run_pair poll-tls-resume small poll "$CONCURRENCY" --tls --resume
run_pair download-4k-tls small download "$CONCURRENCY" --tls
SERVERS="pop3d dovecot"
run_pair download-4k small download "$CONCURRENCY"
run_pair pipelined-4k small pipelined "$CONCURRENCY"
run_pair idle small idle "$IDLE" --noop-interval 5
stop_servers small

if [ "$HASHES" -gt 0 ]; then
  for set in sha512 argon2; do  # repeat logins: the warm-up pays each user's first (full) hash on both servers
    start_servers "$set"
    WARM=0.5 warm_up "$set" "$P_PORT" "$D_PORT"
    run_pair "poll-$set" "$set" poll "$CONCURRENCY" --timeout 120
    stop_servers "$set"
  done
fi

start_servers large
run_pair download-100k large download "$CONCURRENCY"
stop_servers large

if [ -d "$W/huge" ]; then
  start_servers huge
  for port in $P_PORT $D_PORT; do  # first login of each: builds pop3d's cache / Dovecot's index
    pop3d bench "127.0.0.1:$port" --report-only --users "$W/huge/users.txt" -c 1 -d 0.5 --timeout 120 --json >/dev/null
  done
  sleep 2.5  # let the directory stamps age past pop3d's trust window (same-tick changes, see maildir.py)
  run_pair second-login-100k huge poll 1 --timeout 120
  stop_servers huge
fi

if [ "$IDLE_BIG" -gt 0 ]; then
  start_servers small
  echo "-- idle-$IDLE_BIG: pop3d only" >&2
  pop3d bench "127.0.0.1:$P_PORT" --report-only --users "$W/small/users.txt" --scenario idle -c "$IDLE_BIG" \
    --procs "$(( PROCS > 2 ? PROCS : 2 ))" --duration $(( DURATION * 3 )) --noop-interval 5 --server-pid "$P_PID" \
    --timeout 60 --json > "$W/results/idle-$IDLE_BIG-pop3d.json" || true
  stop_servers small
  start_servers small  # fresh processes: the same, with logins spread over 15 s instead of all at once
  echo "-- idle-$IDLE_BIG-ramp: pop3d only" >&2
  pop3d bench "127.0.0.1:$P_PORT" --report-only --users "$W/small/users.txt" --scenario idle -c "$IDLE_BIG" \
    --procs "$(( PROCS > 2 ? PROCS : 2 ))" --duration $(( DURATION * 4 )) --ramp 15 --noop-interval 5 \
    --server-pid "$P_PID" --timeout 60 --json > "$W/results/idle-$IDLE_BIG-ramp-pop3d.json" || true
  stop_servers small
fi

if [ "$IDLE_TLS" -gt 0 ]; then
  start_servers small
  echo "-- idle-tls-$IDLE_TLS: pop3d only, implicit TLS" >&2
  ramp=$(( IDLE_TLS / 400 > 1 ? IDLE_TLS / 400 : 1 ))  # a full handshake each: 400 logins/s, not a burst
  pop3d bench "127.0.0.1:$P_TLS_PORT" --tls --report-only --users "$W/small/users.txt" --scenario idle -c "$IDLE_TLS" \
    --procs "$(( PROCS > 2 ? PROCS : 2 ))" --duration $(( ramp + DURATION * 3 )) --ramp "$ramp" --noop-interval 5 \
    --server-pid "$P_PID" --timeout 60 --json > "$W/results/idle-tls-$IDLE_TLS-pop3d.json" || true
  stop_servers small
fi

"$PY" - "$W/results" <<'EOF'
import json, sys
from pathlib import Path

res = Path(sys.argv[1])
def load(name, server):
    p = res / f"{name}-{server}.json"
    return json.loads(p.read_text()) if p.exists() else None

def lat(r, verbs, q="p50"):
    return sum(r["latency_ms"].get(v, {}).get(q, 0.0) for v in verbs)

rows = [
    ("poll sessions/s", "poll", lambda r: r["sessions_per_s"]),
    ("poll over TLS sessions/s", "poll-tls", lambda r: r["sessions_per_s"]),
    ("poll over TLS, resumed sessions/s", "poll-tls-resume", lambda r: r["sessions_per_s"]),
    ("  (check) resumed handshakes %", "poll-tls-resume", lambda r: 100 * r.get("tls_resumed", 0) / max(1, r["sessions"])),
    ("download 10x4KiB over TLS MB/s", "download-4k-tls", lambda r: r["mb_per_s"]),
    ("poll {SHA512-CRYPT} sessions/s", "poll-sha512", lambda r: r["sessions_per_s"]),
    ("poll {ARGON2ID} sessions/s", "poll-argon2", lambda r: r["sessions_per_s"]),
    ("download 10x4KiB MB/s", "download-4k", lambda r: r["mb_per_s"]),
    ("download 10x4KiB sessions/s", "download-4k", lambda r: r["sessions_per_s"]),
    ("  (check) messages per session", "download-4k", lambda r: r["messages"] / max(1, r["sessions"])),
    ("  (check) octets per message", "download-4k", lambda r: r["octets"] / max(1, r["messages"])),
    ("pipelined 10x4KiB MB/s", "pipelined-4k", lambda r: r["mb_per_s"]),
    ("download 10x100KiB MB/s", "download-100k", lambda r: r["mb_per_s"]),
    ("  (check) messages per session", "download-100k", lambda r: r["messages"] / max(1, r["sessions"])),
    ("  (check) octets per message", "download-100k", lambda r: r["octets"] / max(1, r["messages"])),
    ("idle: sessions held", "idle", lambda r: r["held_max"]),
    ("idle: server KiB/session", "idle", lambda r: r.get("server_memory", {}).get("kib_per_session", 0)),
    ("idle: NOOP p99 ms", "idle", lambda r: r["latency_ms"].get("NOOP", {}).get("p99", 0)),
    ("100k Maildir: PASS+STAT p50 ms", "second-login-100k", lambda r: lat(r, ("PASS", "STAT"))),
    ("100k Maildir: PASS+STAT max ms", "second-login-100k", lambda r: lat(r, ("PASS", "STAT"), "max")),
]
print(f"\n{'metric':<34} {'pop3d':>12} {'dovecot':>12} {'ratio':>8}")
for label, name, f in rows:
    p, d = load(name, "pop3d"), load(name, "dovecot")
    if p is None or d is None:
        continue
    pv, dv = f(p), f(d)
    errs = f"  errors: pop3d {p['errors_total']}, dovecot {d['errors_total']}" if p["errors_total"] or d["errors_total"] else ""
    print(f"{label:<34} {pv:>12.2f} {dv:>12.2f} {pv / dv if dv else float('inf'):>7.2f}x{errs}")
print(f"\n{'pop3d against the bare responder':<34} {'pop3d':>12} {'bare':>12} {'ratio':>8}")
for label, name, f in rows:
    p, b = load(name, "pop3d"), load(name, "bare")
    if p is None or b is None or "(check)" in label:
        continue
    pv, bv = f(p), f(b)
    errs = f"  errors: pop3d {p['errors_total']}, bare {b['errors_total']}" if p["errors_total"] or b["errors_total"] else ""
    print(f"{label:<34} {pv:>12.2f} {bv:>12.2f} {pv / bv if bv else float('inf'):>7.2f}x{errs}")
for p in sorted(res.glob("idle-[0-9]*-pop3d.json")) + sorted(res.glob("idle-tls-*-pop3d.json")):
    r = json.loads(p.read_text())
    m = r.get("server_memory", {})
    lat = r["latency_ms"]
    # NOOP: sent with every session held; NOOP-ramp: before that, the only kind when some were refused
    noop = (f"NOOP p99 {lat['NOOP']['p99']} ms" if "NOOP" in lat
            else f"NOOP p99 {lat.get('NOOP-ramp', {}).get('p99', 0)} ms (NOOP-ramp: not every session was held)")
    print(f"\npop3d alone, {p.stem}: held {r['held_max']} (errors {r['errors_total']}), "
          f"{m.get('kib_per_session', 0):.2f} KiB/session, {noop}, PASS p99 {lat.get('PASS', {}).get('p99', 0)} ms")
EOF
