#!/usr/bin/env bash
# Instructions per session of one pop3d worker, counted by valgrind (callgrind), for one or more revisions.
#
#   benchmarks/instructions.sh REV [REV...]       # e.g. benchmarks/instructions.sh a4c5157 HEAD WORKTREE
#   SCENARIO=download DURATION=20 USERS=200 benchmarks/instructions.sh HEAD WORKTREE
#   CONFIG=pg.toml USERS_FILE=users.txt benchmarks/instructions.sh HEAD WORKTREE   # another store (postgres)
#   benchmarks/instructions.sh BARE HEAD          # BARE: benchmarks/bare_responder.py, the ceiling, same corpus
#
# Why: on a shared machine, sessions per second swing by 20 % between runs and even CPU seconds per session
# move with the neighbours' cache pressure. The number of instructions the server executes per session does
# not: it is the figure to compare when a change claims to make the hot path cheaper (or says it costs
# nothing). It does not see time spent waiting (locks, disks, threads woken late): the throughput scripts
# (ab.sh, compare.sh) remain the judges of that.
#
# The server runs with workers = 1 under callgrind (about 50x slower), is warmed up, its counters are zeroed,
# then the load generator (the current tree's `pop3d bench`, 4 clients) runs DURATION seconds and the counters
# are dumped. WORKTREE as a revision means the files as they are now; BARE is the bare responder of the working
# tree (one process, same passwd-file and Maildirs), what compare.sh measures pop3d against. Needs valgrind
# (apt-get install valgrind).
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: instructions.sh REV [REV...]" >&2; exit 2; }
command -v valgrind >/dev/null || { echo "instructions.sh: valgrind is needed (apt-get install valgrind)" >&2; exit 2; }
SCENARIO=${SCENARIO:-poll} DURATION=${DURATION:-20} USERS=${USERS:-200} PORT=${PORT:-12196}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=$(python3 -c 'import sys; print(sys.executable)')  # the interpreter itself: valgrind does not follow a shim's exec
WORK=$(mktemp -d /tmp/pop3d-instr.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT

if [ -n "${CONFIG:-}" ]; then  # another store, e.g. the postgres driver: CONFIG=FILE USERS_FILE=users.txt
  CFG=$CONFIG USERS_TXT=${USERS_FILE:?with CONFIG, USERS_FILE (user:password lines for pop3d bench)}
else
  (cd "$WORK" && PYTHONPATH="$ROOT" python3 -m pop3d mkmaildrops --users "$USERS" --messages 10 --size 4k corpus >/dev/null)
  CFG=$WORK/corpus/pop3d.toml USERS_TXT=$WORK/corpus/users.txt
fi
sed -e "/^listen/s/127.0.0.1:[0-9]*/127.0.0.1:$PORT/" -e "/^workers *=/d" -e "s/^\[server\]/[server]\nworkers = 1/" \
  "$CFG" > "$WORK/server.toml"

bench() {  # bench SECONDS: sessions completed
  PYTHONPATH="$ROOT" python3 -m pop3d bench --report-only --users "$USERS_TXT" --scenario "$SCENARIO" \
    -c 4 -d "$1" --timeout 60 --json "127.0.0.1:$PORT" | python3 -c 'import json, sys; print(json.load(sys.stdin)["sessions"])'
}

for rev in "$@"; do
  dir="$WORK/rev-$(echo "$rev" | tr -c 'A-Za-z0-9\n' _)"
  mkdir -p "$dir"
  if [ "$rev" = WORKTREE ]; then cp -r "$ROOT/pop3d" "$dir/"; elif [ "$rev" != BARE ]; then git -C "$ROOT" archive "$rev" pop3d | tar -x -C "$dir"; fi
  out="$dir/callgrind.out"
  if [ "$rev" = BARE ]; then
    passwd=$(sed -n 's/^passwd_file *= *"\(.*\)"/\1/p' "$WORK/server.toml")
    location=$(sed -n 's/^location *= *"\(.*\)"/\1/p' "$WORK/server.toml")
    valgrind --tool=callgrind --callgrind-out-file="$out" --dump-instr=no "$PY" "$ROOT/benchmarks/bare_responder.py" \
      --passwd "$passwd" --location "$location" --listen "127.0.0.1:$PORT" --procs 0 > "$dir/server.log" 2>&1 &
  else
    # -P: not the current directory first on sys.path (run from the repository, every revision would be it)
    PYTHONPATH="$dir" valgrind --tool=callgrind --callgrind-out-file="$out" --dump-instr=no \
      "$PY" -P -m pop3d serve --config "$WORK/server.toml" > "$dir/server.log" 2>&1 &
  fi
  vpid=$!
  for _ in $(seq 600); do
    python3 -c "import socket; socket.create_connection(('127.0.0.1', $PORT)).close()" 2>/dev/null && break
    sleep 0.5
  done
  bench 5 > /dev/null  # warm: imports, caches, the size cache files of the corpus
  callgrind_control -z "$vpid" > /dev/null 2>&1
  sessions=$(bench "$DURATION")
  callgrind_control -d "$vpid" > /dev/null 2>&1
  kill -INT "$vpid"; wait "$vpid" 2>/dev/null || true
  # the dump after zeroing is the numbered file with the highest number
  dump=$(ls -1 "$out".* 2>/dev/null | sort -t. -k3 -n | tail -1)
  total=$(sed -n 's/^\(summary\|totals\): *\([0-9]*\).*/\2/p' "$dump" | head -1)
  python3 -c "import sys; r, n, t = sys.argv[1:]; n, t = int(n), int(t); print(f'{r:12s} {n:6d} sessions  {t / n / 1e6:8.2f} M instructions/session')" \
    "$rev" "$sessions" "$total"
done
