#!/usr/bin/env bash
# Usage: scripts/browser.sh -> prints the path of a headless-capable Chromium, installing Debian's `chromium`
# package first when it is missing and this is a root shell with apt-get (what CI and the dev machines are).
# The listening page's browser test (tests/test_speech_browser.py) opens speech.html with it.
set -euo pipefail
found=$(command -v chromium || command -v chromium-browser || true)
if [ -z "$found" ]; then
    if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
        echo "scripts/browser.sh: chromium is not installed; install Debian's package: apt-get install -y chromium" >&2
        exit 1
    fi
    echo "scripts/browser.sh: installing chromium (Debian's package)" >&2
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >&2
    found=$(command -v chromium)
fi
echo "$found"
