#!/usr/bin/env bash
# The postgres driver against the Maildir driver, same users, same messages, same generator, one run.
#
#   benchmarks/postgres.sh [WORKDIR]
#   DURATION=10 CONCURRENCY=50 WORKERS=2 USERS=1000 ROUNDS=3 benchmarks/postgres.sh
#
# A throwaway PostgreSQL cluster (tests/pgcluster.py: initdb in WORKDIR, loopback only, no system service)
# gets the users (`pop3d user import`) and the maildrops (`pop3d import --from maildir`, so both servers
# serve the very same octets and UIDLs). Then, in interleaved rounds, pop3d on Maildir and pop3d on
# PostgreSQL each take the poll and download (10 x 4 KiB) scenarios; the medians and the ratio
# postgres / maildir are printed. Multiply by compare.sh's maildir / Dovecot ratio (same sitting) for
# postgres / Dovecot. Needs PostgreSQL's binaries (apt-get install postgresql).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
W=${1:-/tmp/pop3d-pgbench}
DURATION=${DURATION:-10} CONCURRENCY=${CONCURRENCY:-50} WORKERS=${WORKERS:-$(nproc)} USERS=${USERS:-1000}
ROUNDS=${ROUNDS:-3} PORT=${PORT:-12310} POOL=${POOL:-10}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
pop3d() { python3 -m pop3d "$@"; }
rm -rf "$W"; mkdir -p "$W"
trap 'kill $(jobs -p) 2>/dev/null || true' EXIT

(cd "$W" && pop3d mkmaildrops --users "$USERS" --messages 10 --size 4k corpus >/dev/null)
# the cluster lives as long as this helper process; it prints the DSN of a fresh database, then waits
mkfifo "$W/dsn"
python3 - "$W/dsn" <<'EOF' &
import sys, time
sys.path.insert(0, "tests")
from pgcluster import running_cluster
with running_cluster() as cluster:
    dsn = cluster.new_database()
    with open(sys.argv[1], "w") as f:
        f.write(dsn + "\n")
    while True:
        time.sleep(3600)
EOF
cd "$ROOT"
read -r DSN < "$W/dsn"
cat > "$W/admin.toml" <<EOF
[storage]
driver = "postgres"
dsn = "$DSN"
[auth]
driver = "postgres"
EOF
pop3d db init --config "$W/admin.toml"
pop3d user import "$W/corpus/passwd" --config "$W/admin.toml" >/dev/null
pop3d import --from maildir "$W/corpus/mail/{user}/Maildir" --config "$W/admin.toml" >/dev/null
sed -e "s/127.0.0.1:[0-9]*/127.0.0.1:$PORT/" -e "s/^\[server\]/[server]\nworkers = $WORKERS/" \
  "$W/corpus/pop3d.toml" > "$W/maildir.toml"
sed -e 's/^driver = "maildir"/driver = "postgres"/' -e "s#^location = .*#dsn = \"$DSN\"\npool_size = $POOL#" \
  "$W/maildir.toml" > "$W/postgres.toml"

declare -A R
for r in $(seq "$ROUNDS"); do
  for side in maildir postgres; do
    python3 -m pop3d serve --config "$W/$side.toml" > "$W/$side.log" 2>&1 &  # not the function: $! must be pop3d
    pid=$!
    for _ in $(seq 100); do
      python3 -c "import socket; socket.create_connection(('127.0.0.1', $PORT)).close()" 2>/dev/null && break
      sleep 0.1
    done
    for sc in poll download; do
      rate=$(pop3d bench --report-only --users "$W/corpus/users.txt" --scenario "$sc" -c "$CONCURRENCY" \
        -d "$DURATION" --json "127.0.0.1:$PORT" |
        python3 -c 'import json, sys; d = json.load(sys.stdin); print("err" if d.get("errors") else d["sessions_per_s"])')
      R[$sc.$side]="${R[$sc.$side]:-} $rate"
      echo "round $r  $side  $sc  $rate sessions/s"
    done
    kill "$pid"; wait "$pid" 2>/dev/null || true
  done
done
echo
for sc in poll download; do
  python3 - "$sc" "${R[$sc.maildir]}" "${R[$sc.postgres]}" <<'EOF'
import statistics, sys
sc, m, p = sys.argv[1], sys.argv[2].split(), sys.argv[3].split()
if "err" in m + p:
    print(f"{sc:9s} errors in a run: see the rounds above")
else:
    mm, mp = statistics.median(map(float, m)), statistics.median(map(float, p))
    print(f"{sc:9s} maildir {mm:8.0f}/s   postgres {mp:8.0f}/s   postgres/maildir {mp / mm:.2f}  (medians of {len(m)})")
EOF
done
