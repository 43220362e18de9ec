#!/usr/bin/env bash
# Make sure the Debian packages Moorage needs are present.
# Usage: system-deps.sh PACKAGE:BINARY [PACKAGE:BINARY ...]
# As root it installs what is missing with apt-get; otherwise it names the
# command to run and fails, so nobody is left guessing.
set -euo pipefail
missing=()
for spec in "$@"; do
    pkg=${spec%%:*}; bin=${spec##*:}
    command -v "$bin" >/dev/null 2>&1 || [ -x "/usr/sbin/$bin" ] || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -eq 0 ]; then
    echo "installing Debian packages: ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
    echo "Moorage needs these Debian packages: ${missing[*]}" >&2
    echo "install them with: sudo apt-get install ${missing[*]}" >&2
    exit 1
fi
