#!/usr/bin/env bash
# A stand-in for python:3.11-slim-bookworm built from Debian's archive, for machines that reach
# deb.debian.org and PyPI but no container registry (the sandbox this project is developed in).
# It carries the host's CA bundle, so builds behind a TLS-intercepting proxy reach PyPI.
#   sudo scripts/container/debian_python_image.sh [IMAGE]   # default localhost/debian-python3:bookworm
# then: THREADLINE_TEST_PYTHON_IMAGE=localhost/debian-python3:bookworm make test PYTEST_ARGS=tests/container
set -euo pipefail
image=${1:-localhost/debian-python3:bookworm}
engine=${CONTAINER_ENGINE:-podman}
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$root" http://deb.debian.org/debian
cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" -c . | "$engine" import \
    --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
    --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
    --change 'CMD ["python3"]' - "$image"
