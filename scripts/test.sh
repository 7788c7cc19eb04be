#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs what the tests need (promtool and
# prometheus from Debian's prometheus package, PyYAML), then runs every test. Usage: ./scripts/test.sh [nextest args]
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v promtool >/dev/null 2>&1; then
  echo "installing promtool (Debian package prometheus)…" >&2
  sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi

# The dashboard generator and the deploy checks read YAML.
if ! python3 -c 'import yaml' >/dev/null 2>&1; then
  python3 -m pip install --quiet pyyaml
fi

if cargo nextest --version >/dev/null 2>&1; then
  exec cargo nextest run --locked --no-fail-fast "$@"
else
  exec cargo test --locked --no-fail-fast "$@"
fi
