#!/usr/bin/env bash
# A/B two revisions of pop3d on the same machine, same corpus, same load generator, interleaved rounds, and
# print each scenario's ratio B/A (sessions/s; >1 means B is faster). Shared machines are noisy: interleaving
# and the median of several rounds is what makes the ratio mean something.
#
#   benchmarks/ab.sh REV_A REV_B            # e.g. benchmarks/ab.sh origin/main HEAD, or a4c5157 WORKTREE
#   ROUNDS=5 DURATION=8 CONCURRENCY=20 SCENARIOS="poll pipelined download" WORKERS=1 USERS=200 benchmarks/ab.sh A B
#
# WORKTREE as a revision means the files as they are now (uncommitted edits included). The generator is always
# the current tree's `pop3d bench`, so both servers face the same client.
set -euo pipefail
A=${1:?usage: ab.sh REV_A REV_B}; B=${2:?usage: ab.sh REV_A REV_B}
ROUNDS=${ROUNDS:-3} DURATION=${DURATION:-6} CONCURRENCY=${CONCURRENCY:-20} WORKERS=${WORKERS:-1}
SCENARIOS=${SCENARIOS:-poll pipelined download} PORT=${PORT:-12110} USERS=${USERS:-200}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d /tmp/pop3d-ab.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT

tree() {  # tree REV DIR: the pop3d package of REV in DIR
  mkdir -p "$2"
  if [ "$1" = WORKTREE ]; then cp -r "$ROOT/pop3d" "$2/"; else git -C "$ROOT" archive "$1" pop3d | tar -x -C "$2"; fi
}
tree "$A" "$WORK/a"; tree "$B" "$WORK/b"
(cd "$WORK" && PYTHONPATH="$ROOT" python3 -m pop3d mkmaildrops --users "$USERS" --messages 10 --size 4k corpus >/dev/null)
sed -e "s/127.0.0.1:[0-9]*/127.0.0.1:$PORT/" -e "s/^\[server\]/[server]\nworkers = $WORKERS/" \
  "$WORK/corpus/pop3d.toml" > "$WORK/ab.toml"

# Server CPU per session (user + system time of the server and its workers, from /proc) is the steadier
# figure on a shared machine: other tenants slow the wall clock down far more than they inflate our CPU time.
cpu_ticks() {  # cpu_ticks PID: utime + stime of PID and its children, in clock ticks
  local total=0 p
  for p in "$1" $(pgrep -P "$1" || true); do
    total=$((total + $(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null || echo 0)))
  done
  echo "$total"
}

declare -A RESULTS CPU
for r in $(seq "$ROUNDS"); do
  for side in a b; do
    # -P: not the current directory first on sys.path, or run from the repository both sides would be its code
    PYTHONPATH="$WORK/$side" python3 -P -m pop3d serve --config "$WORK/ab.toml" > "$WORK/server-$side.log" 2>&1 &
    pid=$!
    for _ in $(seq 100); do
      python3 -c "import socket; socket.create_connection(('127.0.0.1', $PORT)).close()" 2>/dev/null && break
      sleep 0.1
    done
    for sc in $SCENARIOS; do
      before=$(cpu_ticks "$pid")
      out=$(PYTHONPATH="$ROOT" python3 -m pop3d bench --report-only --users "$WORK/corpus/users.txt" --scenario "$sc" \
        -c "$CONCURRENCY" -d "$DURATION" --json "127.0.0.1:$PORT")
      after=$(cpu_ticks "$pid")
      read -r rate cpu < <(python3 -c '
import json, os, sys
d = json.loads(sys.argv[1]); ticks = int(sys.argv[3]) - int(sys.argv[2])
n = d.get("sessions") or 0
per = ticks / os.sysconf("SC_CLK_TCK") * 1e6 / n if n else 0
print("err" if d.get("errors") else d["sessions_per_s"], "err" if d.get("errors") else f"{per:.0f}")' "$out" "$before" "$after")
      RESULTS[$sc.$side]="${RESULTS[$sc.$side]:-} $rate"
      CPU[$sc.$side]="${CPU[$sc.$side]:-} $cpu"
      echo "round $r  $side=$([ $side = a ] && echo "$A" || echo "$B")  $sc  $rate sessions/s  $cpu server-CPU-us/session"
    done
    kill "$pid"; wait "$pid" 2>/dev/null || true
  done
done
echo
for sc in $SCENARIOS; do
  python3 - "$sc" "${RESULTS[$sc.a]}" "${RESULTS[$sc.b]}" "${CPU[$sc.a]}" "${CPU[$sc.b]}" <<'EOF'
import statistics, sys
sc, a, b, ca, cb = sys.argv[1], sys.argv[2].split(), sys.argv[3].split(), sys.argv[4].split(), sys.argv[5].split()
if "err" in a + b:
    print(f"{sc:12s} errors in a run: see the rounds above")
else:
    ma, mb = statistics.median(map(float, a)), statistics.median(map(float, b))
    qa, qb = statistics.median(map(float, ca)), statistics.median(map(float, cb))
    print(f"{sc:12s} A {ma:8.0f}/s   B {mb:8.0f}/s   B/A {mb / ma:.2f}   "
          f"server CPU/session A {qa:.0f} us  B {qb:.0f} us  B/A {qb / qa:.2f}   (medians of {len(a)} rounds)")
EOF
done
