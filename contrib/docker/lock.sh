#!/bin/sh
# Regenerate the image's lock files from pyproject.toml, with every file hash PyPI lists for each pin (so the
# same lock installs on amd64 and arm64):
#   requirements.lock              the runtime dependencies (repo root; `pip install --require-hashes -r` it)
#   contrib/docker/build.lock      the build backend that turns the source into a wheel
# Run from anywhere, with the image's Python minor version (PYTHON, default python3.11):
#   contrib/docker/lock.sh              after a dependency in pyproject.toml changed (other pins are kept)
#   contrib/docker/lock.sh --upgrade    to take the newest releases of everything
# Extra arguments go to pip-compile (e.g. --upgrade-package pydantic).
# pip-tools is installed into a throw-away virtualenv, so nothing of your environment leaks into the lock.
set -eu
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3.11}
# the lock comes from the public index alone: no pip configuration file, local wheel directory or constraint
# of this machine takes part (PIP_CERT and PIP_INDEX_URL still apply, for networks that need them)
export PIP_CONFIG_FILE=/dev/null
unset PIP_FIND_LINKS PIP_EXTRA_INDEX_URL PIP_CONSTRAINT PIP_NO_INDEX
PIP_TOOLS=pip-tools==7.6.2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT INT TERM
"$PYTHON" -m venv "$tmp/venv"
"$tmp/venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip "$PIP_TOOLS"
export CUSTOM_COMPILE_COMMAND="contrib/docker/lock.sh"
compile() {
    "$tmp/venv/bin/pip-compile" --quiet --generate-hashes --strip-extras --no-emit-index-url \
        --no-emit-find-links --newline=lf "$@"
}
compile "$@" --output-file requirements.lock pyproject.toml
# the [build-system] requirement of pyproject.toml; --allow-unsafe: setuptools is what we pin here
sed -n 's/^requires = \[\(.*\)\]$/\1/p' pyproject.toml | tr -d '" ' | tr ',' '\n' |
    compile "$@" --allow-unsafe --output-file contrib/docker/build.lock -
