#!/bin/sh
# Make python$1 (with venv and C headers) plus the image's system packages available in a Debian or
# Ubuntu base image. Used by docker/Dockerfile; runs as root at build time.
#
#   python:3.11-slim          already has /usr/local/bin/python3.11 (headers included): nothing to add
#   Debian / Ubuntu with it   python3.11 python3.11-venv python3.11-dev from the distribution
#   Ubuntu without it (24.04) the same packages from the deadsnakes PPA (key pinned by fingerprint)
#
# Always installed: tini (PID 1: forwards SIGTERM to the one process it starts, reaps zombies) and
# ca-certificates. With WITH_COMPILER=1 (the default) also gcc/g++: triton and torch.compile build
# small C launchers at run time, so a CUDA worker with LIGHTX2V_COMPILE on needs a compiler.
set -eu

version="${1:?usage: install-python.sh PYTHON_VERSION}"
python="python${version}"
deadsnakes_key=F23C5A6CF475977595C89F51BA6932366A755776
export DEBIAN_FRONTEND=noninteractive

apt-get update
packages="tini ca-certificates"
if [ "${WITH_COMPILER:-1}" = 1 ]; then
    packages="$packages gcc g++ libc6-dev"
fi

if command -v "$python" >/dev/null 2>&1; then
    echo "install-python: using $(command -v "$python")"
else
    if ! apt-cache policy "$python-venv" | grep -q 'Candidate: [0-9]'; then
        # shellcheck source=/dev/null
        . /etc/os-release
        if [ "$ID" != ubuntu ]; then
            echo "install-python: $ID $VERSION_ID has no $python package; use a base image that has it" >&2
            exit 1
        fi
        echo "install-python: $python from the deadsnakes PPA for $VERSION_CODENAME"
        helpers=""
        for tool in curl gnupg; do
            dpkg -s "$tool" >/dev/null 2>&1 || helpers="$helpers $tool"
        done
        # shellcheck disable=SC2086 # word splitting of the package list is intended
        [ -z "$helpers" ] || apt-get install -y --no-install-recommends $helpers ca-certificates
        install -d -m 0755 /etc/apt/keyrings
        curl -fsSL "https://keyserver.ubuntu.com/pks/lookup?op=get&search=0x${deadsnakes_key}" \
            | gpg --batch --dearmor -o /etc/apt/keyrings/deadsnakes.gpg
        # Refuse a key that is not the one named above.
        gpg --batch --show-keys --with-colons /etc/apt/keyrings/deadsnakes.gpg | grep -q "^fpr:*${deadsnakes_key}:"
        echo "deb [signed-by=/etc/apt/keyrings/deadsnakes.gpg] https://ppa.launchpadcontent.net/deadsnakes/ppa/ubuntu ${VERSION_CODENAME} main" \
            > /etc/apt/sources.list.d/deadsnakes.list
        # shellcheck disable=SC2086
        [ -z "$helpers" ] || apt-get purge -y --auto-remove $helpers
        apt-get update
    fi
    packages="$packages $python $python-venv $python-dev"
fi

# shellcheck disable=SC2086
apt-get install -y --no-install-recommends $packages
rm -rf /var/lib/apt/lists/*
"$python" -c 'import ensurepip, sqlite3, ssl, sys; print("install-python:", sys.version)'
