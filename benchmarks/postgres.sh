#!/usr/bin/env bash
# The postgres driver against the Maildir driver, and against Dovecot, same users, same messages, same
# generator, one run.
#
#   benchmarks/postgres.sh [WORKDIR]
#   DURATION=10 CONCURRENCY=50 WORKERS=2 USERS=1000 ROUNDS=3 DOVECOT=1 benchmarks/postgres.sh
#
# A throwaway PostgreSQL cluster (tests/pgcluster.py: initdb in WORKDIR, loopback only, no system service)
# gets the users (`pop3d user import`) and the maildrops (`pop3d import --from maildir`, so both drivers
# serve the very same octets and UIDLs). Then, in interleaved rounds, pop3d on Maildir, pop3d on PostgreSQL
# and (DOVECOT=1, the default as root; it installs dovecot-pop3d, see benchmarks/dovecot.sh) Dovecot on
# its own copy of the Maildirs each take the poll and download (10 x 4 KiB) scenarios; the medians and the
# ratios postgres / maildir and postgres / Dovecot are printed. Needs PostgreSQL's binaries (apt-get
# install postgresql). Every server and the cluster are stopped at the end, whatever happens.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
W=${1:-/tmp/pop3d-pgbench}
DURATION=${DURATION:-10} CONCURRENCY=${CONCURRENCY:-50} WORKERS=${WORKERS:-$(nproc)} USERS=${USERS:-1000}
ROUNDS=${ROUNDS:-3} PORT=${PORT:-12310} POOL=${POOL:-10}
DOVECOT=${DOVECOT:-$([ "$(id -u)" = 0 ] && echo 1 || echo 0)}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
pop3d() { python3 -m pop3d "$@"; }
rm -rf "$W"; mkdir -p "$W"
CLUSTER=""
SERVER=""
cleanup() {
  [ -z "$SERVER" ] || kill "$SERVER" 2>/dev/null || true
  [ -z "$CLUSTER" ] || kill -TERM "$CLUSTER" 2>/dev/null || true  # the helper stops the cluster on SIGTERM
  wait 2>/dev/null || true
}
trap cleanup EXIT

(cd "$W" && pop3d mkmaildrops --users "$USERS" --messages 10 --size 4k corpus >/dev/null)
# the cluster lives as long as this helper process; it prints the DSN of a fresh database, then waits
mkfifo "$W/dsn"
python3 - "$W/dsn" <<'PY' &
import signal, sys, time
sys.path.insert(0, "tests")
from pgcluster import running_cluster
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # leave the `with`: the cluster stops, its files go
with running_cluster() as cluster:
    dsn = cluster.new_database()
    with open(sys.argv[1], "w") as f:
        f.write(dsn + "\n")
    while True:
        time.sleep(3600)
PY
CLUSTER=$!
cd "$ROOT"
read -r DSN < "$W/dsn"
cat > "$W/admin.toml" <<TOML
[storage]
driver = "postgres"
dsn = "$DSN"
[auth]
driver = "postgres"
TOML
pop3d db init --config "$W/admin.toml"
pop3d user import "$W/corpus/passwd" --config "$W/admin.toml" >/dev/null
pop3d import --from maildir "$W/corpus/mail/{user}/Maildir" --config "$W/admin.toml" >/dev/null
sed -e "s/127.0.0.1:[0-9]*/127.0.0.1:$PORT/" -e "s/^\[server\]/[server]\nworkers = $WORKERS/" \
  "$W/corpus/pop3d.toml" > "$W/maildir.toml"
sed -e 's/^driver = "maildir"/driver = "postgres"/' -e "s#^location = .*#dsn = \"$DSN\"\npool_size = $POOL#" \
  "$W/maildir.toml" > "$W/postgres.toml"
SIDES="maildir postgres"
if [ "$DOVECOT" = 1 ]; then
  # shellcheck source=benchmarks/dovecot.sh
  . "$ROOT/benchmarks/dovecot.sh"
  dovecot_install
  mkdir -p "$W/dovecot"
  cp -a "$W/corpus/mail" "$W/dovecot/mail"
  chown -R mail:mail "$W/dovecot/mail"
  dovecot_conf "$W/dovecot" "$W/corpus/passwd" "$PORT"
  SIDES="maildir postgres dovecot"
fi

start() {  # side: starts its server on $PORT, sets SERVER
  case $1 in
    dovecot) dovecot -c "$W/dovecot/dovecot.conf" -F > "$W/dovecot/stdout.log" 2>&1 & ;;
    *) python3 -m pop3d serve --config "$W/$1.toml" > "$W/$1.log" 2>&1 & ;;
  esac
  SERVER=$!
  for _ in $(seq 100); do
    python3 -c "import socket; socket.create_connection(('127.0.0.1', $PORT)).close()" 2>/dev/null && break
    sleep 0.1
  done
}

declare -A R
for r in $(seq "$ROUNDS"); do
  for side in $SIDES; do
    start "$side"
    if [ "$r" = 1 ] && [ "$side" = dovecot ]; then  # first logins build Dovecot's indexes: not measured
      pop3d bench --report-only --users "$W/corpus/users.txt" --scenario poll -c "$CONCURRENCY" -d 3 \
        --json "127.0.0.1:$PORT" >/dev/null || true
    fi
    for sc in poll download; do
      rate=$(pop3d bench --report-only --users "$W/corpus/users.txt" --scenario "$sc" -c "$CONCURRENCY" \
        -d "$DURATION" --json "127.0.0.1:$PORT" |
        python3 -c 'import json, sys; d = json.load(sys.stdin); print("err" if d.get("errors") else d["sessions_per_s"])')
      R[$sc.$side]="${R[$sc.$side]:-} $rate"
      echo "round $r  $side  $sc  $rate sessions/s"
    done
    kill "$SERVER"; wait "$SERVER" 2>/dev/null || true
    SERVER=""
  done
done
echo
for sc in poll download; do
  python3 - "$sc" "${R[$sc.maildir]}" "${R[$sc.postgres]}" "${R[$sc.dovecot]:-}" <<'PY'
import statistics, sys
sc, m, p, d = sys.argv[1], sys.argv[2].split(), sys.argv[3].split(), sys.argv[4].split()
if "err" in m + p + d:
    print(f"{sc:9s} errors in a run: see the rounds above")
else:
    mm, mp = statistics.median(map(float, m)), statistics.median(map(float, p))
    line = f"{sc:9s} maildir {mm:6.0f}/s  postgres {mp:6.0f}/s  postgres/maildir {mp / mm:.2f}"
    if d:
        md = statistics.median(map(float, d))
        line += f"  dovecot {md:6.0f}/s  postgres/dovecot {mp / md:.2f}"
    print(f"{line}  (medians of {len(m)})")
PY
done
