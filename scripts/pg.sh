#!/usr/bin/env bash
# A throwaway PostgreSQL cluster for development, tests and the demo.
#
#   scripts/pg.sh start [DIR]   initdb (if needed) + start on a free loopback
#                               port; prints `export DATABASE_URL=...`
#   scripts/pg.sh stop DIR      stop it (the data stays in DIR)
#   scripts/pg.sh destroy DIR   stop and delete DIR
#
# It never touches the system cluster on 5432: the cluster lives in DIR (a new
# temp folder by default), listens on 127.0.0.1 only, trusts local
# connections, and its superuser is `handid`, so `#[sqlx::test]` can create a
# fresh database per test. As root, the server runs as the `postgres` user
# (initdb refuses root).
set -euo pipefail

pg_bin() {
  if [ -n "${PG_BIN:-}" ]; then echo "$PG_BIN"; return; fi
  local d
  d="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)"
  [ -n "$d" ] || { echo "pg.sh: no PostgreSQL server found; run scripts/setup.sh" >&2; exit 1; }
  echo "$d"
}

as_owner() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

cmd="${1:-}"
case "$cmd" in
  start)
    dir="${2:-$(mktemp -d /tmp/handid-pg.XXXXXX)}"
    bin="$(pg_bin)"
    mkdir -p "$dir"
    [ "$(id -u)" = 0 ] && chown postgres: "$dir"
    if [ ! -f "$dir/data/PG_VERSION" ]; then
      as_owner "$bin/initdb" -D "$dir/data" -U handid --auth=trust --encoding=UTF8 --locale=C.UTF-8 >"$dir/initdb.log" 2>&1 \
        || { cat "$dir/initdb.log" >&2; exit 1; }
    fi
    port="${PGPORT_HANDID:-$(free_port)}"
    # fsync stays on: tests kill the server process and expect acknowledged
    # enrolments to survive, and the demo should behave like production.
    as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
      -o "-h 127.0.0.1 -p $port -k $dir -c max_connections=200 -c shared_buffers=64MB" start >/dev/null \
      || { cat "$dir/server.log" >&2; exit 1; }
    echo "$port" > "$dir/port"
    "$bin/psql" -h 127.0.0.1 -p "$port" -U handid -d postgres -qAt \
      -c "SELECT 1 FROM pg_database WHERE datname = 'handid'" | grep -q 1 \
      || "$bin/createdb" -h 127.0.0.1 -p "$port" -U handid handid
    echo "export HANDID_PG_DIR=$dir"
    echo "export DATABASE_URL=postgres://handid@127.0.0.1:$port/handid"
    ;;
  stop|destroy)
    dir="${2:?usage: pg.sh $cmd DIR}"
    if [ -f "$dir/data/postmaster.pid" ]; then
      as_owner "$(pg_bin)/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null || true
    fi
    if [ "$cmd" = destroy ]; then rm -rf "$dir"; fi
    ;;
  *)
    echo "usage: scripts/pg.sh start [DIR] | stop DIR | destroy DIR" >&2
    exit 2
    ;;
esac
