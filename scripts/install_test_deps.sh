#!/usr/bin/env bash
# Install the Debian packages the integration tests need (Alertmanager, Chromium for the viewer's browser tests, ...).
# Idempotent: a package whose binary is already on PATH is skipped, and
# `apt-get update` runs only when something is missing.
set -euo pipefail

# "binary package" pairs: the command the tests look for, and the package that provides it.
REQUIRED=(
    "prometheus-alertmanager prometheus-alertmanager"
    "amtool prometheus-alertmanager"
    "prometheus prometheus"
    "promtool prometheus"
    "docker-compose docker-compose"
    "chromium chromium"
    "chromedriver chromium-driver"
    "cc gcc"
)

missing=()
for entry in "${REQUIRED[@]}"; do
    read -r binary package <<<"$entry"
    if command -v "$binary" >/dev/null 2>&1; then
        echo "install_test_deps: $binary present ($(command -v "$binary"))"
    else
        missing+=("$package")
    fi
done

if [ "${#missing[@]}" -eq 0 ]; then
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo"
    else
        echo "install_test_deps: need root (or sudo) to install: ${missing[*]}" >&2
        exit 1
    fi
fi

echo "install_test_deps: installing ${missing[*]}"
$SUDO apt-get update -q
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"

# Debian's package starts a system service where an init system runs; the tests
# start their own instance on a free port, so a running service is harmless.
for entry in "${REQUIRED[@]}"; do
    read -r binary _ <<<"$entry"
    if ! command -v "$binary" >/dev/null 2>&1; then
        echo "install_test_deps: $binary still missing after install" >&2
        exit 1
    fi
done
