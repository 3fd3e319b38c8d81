#!/usr/bin/env bash
# A real headless browser for the vlm-ui test: Debian's chromium and chromium-driver (run as root; idempotent).
#
#   bash .ci/browser_up.sh        # apt-get install both if missing, then check they run
set -euo pipefail

if [[ $(id -u) -ne 0 ]]; then
    echo "browser_up.sh: must run as root (it installs packages)" >&2
    exit 1
fi
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    echo "browser_up.sh: installing chromium and chromium-driver from apt"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq chromium chromium-driver >/dev/null
fi
chromium --version
chromedriver --version
