# shellcheck shell=bash
# Building the binaries the scripts run, wherever cargo puts them.

# cargo_binary PACKAGE BIN [CARGO ARGS...]: builds binary BIN of PACKAGE and prints its
# path as cargo reports it (so CARGO_TARGET_DIR, a profile or a target triple put it where
# they put it; nothing here guesses target/...).
cargo_binary() {
  local package=$1 bin=$2
  shift 2
  cargo build --quiet --message-format=json-render-diagnostics -p "$package" --bin "$bin" "$@" \
    | python3 -c '
import json, sys
name, path = sys.argv[1], ""
for line in sys.stdin:
    try:
        message = json.loads(line)
    except ValueError:
        continue
    if message.get("reason") == "compiler-artifact" and message.get("executable") \
            and message["target"]["name"] == name:
        path = message["executable"]
if not path:
    sys.exit("cargo built no binary named " + name)
print(path)' "$bin"
}
