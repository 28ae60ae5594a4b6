#!/usr/bin/env bash
# Runs the ```console session of README.md in a fresh directory and compares
# what each command prints (stdout and stderr) with what the README shows.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
export PATH="$top/target/release:$PATH"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

awk '/^```console$/{f=1;next} /^```$/{f=0} f' "$top/README.md" > "$work/session"
[ -s "$work/session" ] || { echo "README.md has no console session"; exit 1; }

cd "$work"
: > expected
: > actual
while IFS= read -r line; do
  if [[ $line == '$ '* ]]; then
    cmd=${line#'$ '}
    if [[ $cmd == qemu-* ]] && ! command -v "${cmd%% *}" >/dev/null; then
      [ "${CI:-}" = true ] && { echo "missing ${cmd%% *} under CI"; exit 1; }
      echo "SKIPPED: README session needs ${cmd%% *}"; exit 0
    fi
    echo "$line" >> expected
    echo "$line" >> actual
    bash -c "$cmd" >> actual 2>&1 || true
  else
    echo "$line" >> expected
  fi
done < session
if ! diff -u expected actual; then
  echo "README.md's command-line session no longer matches what qbm prints"
  exit 1
fi
echo "README session: $(grep -c '^\$ ' expected) commands matched"
