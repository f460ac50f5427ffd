#!/usr/bin/env bash
# Build the testbed's container image locally (no registry): a minimal Debian bookworm (mmdebstrap, from Debian's
# archive) with python3, plus the runtime venv (Ray, torch CPU, the embed worker's needs, vLLM's CPU build) under
# the same path as on the hosts. Imported into the read-only image store the fake Sparks' podman reads
# (additionalimagestores). Rebuilt only when the venv's packages changed (label sparkctl.runtime).
# Usage: build_image.sh <runtime venv>   (root; run by tests/prepare.sh)
set -euo pipefail
RUNTIME=${1:?runtime venv}
STORE=/var/lib/sparkctl-testbed-images
IMAGE=localhost/sparkctl-runtime:test
podman_store() { podman --root "$STORE" --runroot /run/sparkctl-testbed-images "$@"; }

stamp=$( { /usr/bin/python3 -V; ls "$RUNTIME"/lib/python3*/site-packages | grep -E '\.dist-info$' | sort; } \
         | sha256sum | cut -c1-16)
mkdir -p "$STORE"
have=$(podman_store image inspect --format '{{index .Labels "sparkctl.runtime"}}' "$IMAGE" 2>/dev/null || true)
if [ "$have" = "$stamp" ]; then
    echo "image $IMAGE is up to date ($stamp)"
    exit 0
fi
work=$(mktemp -d /var/tmp/sparkctl-image.XXXXXX)
trap 'rm -rf "$work"' EXIT
mmdebstrap --quiet --variant=minbase --include=python3,procps --mode=root bookworm "$work/base.tar" \
    http://deb.debian.org/debian
mkdir "$work/rootfs"
tar -C "$work/rootfs" -xf "$work/base.tar"
mkdir -p "$work/rootfs$(dirname "$RUNTIME")"
cp -a "$RUNTIME" "$work/rootfs$RUNTIME"
podman_store rmi -f "$IMAGE" >/dev/null 2>&1 || true
tar -C "$work/rootfs" --format=pax -c . | podman_store import \
    --change "ENV PATH=$RUNTIME/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
    --change "LABEL sparkctl.runtime=$stamp" - "$IMAGE"
echo "image $IMAGE built ($stamp)"
