#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs what the tests need (promtool and
# prometheus from Debian's prometheus package, PyYAML from python3-yaml), then runs every test.
# Usage: ./scripts/test.sh [nextest args]
set -euo pipefail
cd "$(dirname "$0")/.."

sudo=""
[ "$(id -u)" -ne 0 ] && sudo="sudo"
have_apt=""
command -v apt-get >/dev/null 2>&1 && have_apt=1
apt_packages=()

if ! command -v promtool >/dev/null 2>&1; then
  if [ -z "$have_apt" ]; then
    echo "promtool not found and no apt-get here: install Prometheus (promtool and prometheus on PATH)" >&2
    exit 1
  fi
  echo "installing promtool (Debian package prometheus)…" >&2
  apt_packages+=(prometheus)
fi

# The dashboard generator and the deploy checks read YAML. Debian's Python is externally
# managed (PEP 668): pip refuses to install into it, so PyYAML comes from apt, and from a venv
# under target/ only where there is no apt (or apt's package does not reach this python3).
venv=target/test-venv
use_venv() {
  if ! "$venv/bin/python3" -c 'import yaml' >/dev/null 2>&1; then
    echo "installing PyYAML into a venv ($venv, pip install pyyaml)…" >&2
    python3 -m venv "$venv"
    "$venv/bin/python3" -m pip install --quiet pyyaml
  fi
  # The tests run `python3`: the venv's comes first.
  PATH="$PWD/$venv/bin:$PATH"
  export PATH
}
if ! python3 -c 'import yaml' >/dev/null 2>&1; then
  if [ -n "$have_apt" ]; then
    echo "installing PyYAML (Debian package python3-yaml)…" >&2
    apt_packages+=(python3-yaml)
  else
    use_venv
  fi
fi

# One apt-get update for everything missing.
if [ "${#apt_packages[@]}" -gt 0 ]; then
  $sudo apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${apt_packages[@]}" >/dev/null
fi

# A python3 that is not Debian's (pyenv, a local build) does not see python3-yaml.
if ! python3 -c 'import yaml' >/dev/null 2>&1; then
  use_venv
fi

if cargo nextest --version >/dev/null 2>&1; then
  exec cargo nextest run --locked --no-fail-fast "$@"
else
  exec cargo test --locked --no-fail-fast "$@"
fi
