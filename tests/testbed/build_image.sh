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

# Debian packages of the image: python3; procps (ps, for the hosts' probe inside a container); what vLLM's CPU build
# needs at run time, as vLLM's own CPU image installs it (vLLM docker/Dockerfile.cpu: gcc-12 g++-12 libnuma-dev):
# libnuma1 (vllm/_C*.so links libnuma.so.1) and g++ with the Python headers (torch.compile's inductor builds its CPU
# kernels with the C++ compiler: "InvalidCxxCompiler" without one), and openssl, which inductor runs to checksum its
# precompiled header (torch/_inductor/codecache.py, _get_file_checksum: `openssl sha512`).
PACKAGES=python3,python3-dev,procps,libnuma1,g++,openssl
stamp=$( { /usr/bin/python3 -V; echo "$PACKAGES"; ls "$RUNTIME"/lib/python3*/site-packages | grep -E '\.dist-info$' | sort; } \
         | sha256sum | cut -c1-16)
mkdir -p "$STORE"
have=$(podman_store image inspect --format '{{index .Labels "sparkctl.runtime"}}' "$IMAGE" 2>/dev/null || true)
build_runtime_image() {
    work=$(mktemp -d /var/tmp/sparkctl-image.XXXXXX)
    trap 'rm -rf "$work"' EXIT
    mmdebstrap --quiet --variant=minbase --include="$PACKAGES" --mode=root bookworm "$work/base.tar" \
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
}
if [ "$have" = "$stamp" ]; then
    echo "image $IMAGE is up to date ($stamp)"
else
    build_runtime_image
fi

# A second image, built like the vllm-openai images (vLLM's docker/Dockerfile: `ENTRYPOINT ["vllm", "serve"]`, no
# Ray), carrying the CUDA requirement NGC images state (NVIDIA_REQUIRE_CUDA, read by the NVIDIA Container Toolkit).
# It is kept as an archive, not in the shared store: a test loads it on one fake Spark only, and sparkctl copies it.
# The Ray wheel beside it is what sparkctl's `runtime.add_ray` installs into a derived image on the hosts (they reach
# no package index).
ARCHIVES=/var/lib/sparkctl-testbed-archives
OPENAI_LIKE=localhost/sparkctl-vllm-openai-like:test
mkdir -p "$ARCHIVES/ray-wheels"
if [ "$(cat "$ARCHIVES/openai-like.stamp" 2>/dev/null)" != "$stamp" ]; then
    site=$("$RUNTIME/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    ctx=$(mktemp -d /var/tmp/sparkctl-openai-like.XXXXXX)
    cat > "$ctx/Containerfile" <<CONTAINERFILE
FROM $IMAGE
RUN rm -rf $site/ray $site/ray-*.dist-info $RUNTIME/bin/ray
ENV NVIDIA_REQUIRE_CUDA="cuda>=13.0" CUDA_VERSION=13.0.1
ENTRYPOINT ["vllm", "serve"]
CONTAINERFILE
    podman_store --runtime runc --cgroup-manager cgroupfs build -q -t "$OPENAI_LIKE" "$ctx"
    rm -f "$ARCHIVES/openai-like.tar"
    podman_store save --format docker-archive -o "$ARCHIVES/openai-like.tar" "$OPENAI_LIKE"
    podman_store rmi -f "$OPENAI_LIKE" >/dev/null
    rm -rf "$ctx"
    echo "$stamp" > "$ARCHIVES/openai-like.stamp"
    echo "image $OPENAI_LIKE saved to $ARCHIVES/openai-like.tar"
fi
ray_version=$("$RUNTIME/bin/python" -c 'import ray; print(ray.__version__)')
if ! ls "$ARCHIVES/ray-wheels/ray-$ray_version-"*.whl >/dev/null 2>&1; then
    "$RUNTIME/bin/pip" download -q --no-deps "ray==$ray_version" -d "$ARCHIVES/ray-wheels"
fi
chmod -R a+rX "$ARCHIVES"
