#!/bin/bash
# PID 1 of one fake Spark (sparkctl testbed). Started by tests/testbed as
#   ip netns exec sptb-<host> unshare --mount --pid --uts --ipc --fork --mount-proc bash boot.sh
# It builds the host's private view of the filesystem, starts the daemons a DGX Spark runs
# (dbus, udev, NetworkManager, sshd) plus the SIMULATED RoCE GID table updater, then reaps
# orphans forever. Its parameters come from the environment (TB_*), set by tests/testbed.
set -euo pipefail

: "${TB_NAME:?}" "${TB_HOSTDIR:?}" "${TB_MGMT_IF:?}" "${TB_MGMT_CIDR:?}" "${TB_GATEWAY:?}"
: "${TB_LIBEXEC:?}" "${TB_SIMBIN:?}" "${TB_SIM_MOUNT:?}"

status() { printf '%s\n' "$*" > "$TB_HOSTDIR/status"; }
trap 'status "failed: line $LINENO: $BASH_COMMAND"' ERR
status booting
set -x

hostname "$TB_NAME"
mount --make-rprivate /

# Runtime state of this host only.
mount -t tmpfs -o mode=0755 tmpfs /run
mkdir -p /run/dbus /run/sshd /run/udev /run/lock /run/NetworkManager /run/user "$TB_SIM_MOUNT"
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
# /run/lock as on Debian and Ubuntu: its own world-writable sticky tmpfs (Debian's systemd patch
# "Make /run/lock tmpfs an API fs", src/core/mount-setup.c: mode=1777, nosuid, nodev, noexec, 5M).
mount -t tmpfs -o mode=1777,nosuid,nodev,noexec,size=5m tmpfs /run/lock
mount --bind "$TB_HOSTDIR/tmp" /tmp

# Writable per-host views of /etc, /home and /root; the host's own files (hostname, hosts, machine-id,
# NetworkManager config, sshd keys and config, sudoers, shadow) were seeded into the upper layers.
mount -t overlay overlay -o "lowerdir=/etc,upperdir=$TB_HOSTDIR/etc-up,workdir=$TB_HOSTDIR/etc-work" /etc
mount -t overlay overlay -o "lowerdir=/home,upperdir=$TB_HOSTDIR/home-up,workdir=$TB_HOSTDIR/home-work" /home
mount -t overlay overlay -o "lowerdir=/root,upperdir=$TB_HOSTDIR/root-up,workdir=$TB_HOSTDIR/root-work" /root
mount --bind "$TB_HOSTDIR/var-lib-nm" /var/lib/NetworkManager
mount --bind "$TB_HOSTDIR/etc-up/machine-id" /var/lib/dbus/machine-id

# SIMULATED hardware: state dir, GPU/RDMA tools on PATH, RoCE entries under /sys/class/infiniband.
mount --bind "$TB_HOSTDIR/sim" "$TB_SIM_MOUNT"
mount -t overlay overlay -o "lowerdir=$TB_SIMBIN:/usr/local/bin" /usr/local/bin
# The runtime venv's bin/ shows vLLM itself (its CPU build, installed by tests/prepare.sh). The SIMULATED
# `vllm` (for what needs a GPU) is laid over it on demand by Testbed.use_vllm("simulated"), never here.
# sysfs cannot hold a new directory, and an overlay on /sys/class caches lookups (an interface
# looked up before it existed stays invisible). So /sys/class becomes a tmpfs with a bind mount
# of every real class directory (live, e.g. net/) plus the fake infiniband/ (symlinks into the
# sim state dir, like the real class symlinks into /sys/devices).
sysclass=/run/testbed-sysclass
mkdir "$sysclass"
mount -t tmpfs -o mode=0755 tmpfs "$sysclass"
for d in /sys/class/*; do
    name=${d##*/}
    [ "$name" = infiniband ] && continue
    mkdir "$sysclass/$name"
    mount --bind "$d" "$sysclass/$name"
done
cp -a "$TB_HOSTDIR/sysclass/infiniband" "$sysclass/infiniband"
mount --rbind "$sysclass" /sys/class
umount -l "$sysclass"
rmdir "$sysclass"

# The container engine (container mode): `ip netns exec` mounted a fresh /sys without the cgroup hierarchies;
# mount this machine's again (TB_CGROUPS: dir=fstype:options words), so runc can place containers.
# A failure here leaves the host up (only container mode needs them) and is logged.
if [ -n "${TB_CGROUPS:-}" ]; then
    case " $TB_CGROUPS " in *" .=cgroup2:"*) ;; *) mount -t tmpfs -o mode=0755 tmpfs /sys/fs/cgroup ;; esac
    for word in $TB_CGROUPS; do
        dir=${word%%=*}; spec=${word#*=}; fstype=${spec%%:*}; opts=${spec#*:}
        mkdir -p "/sys/fs/cgroup/$dir" || true
        if [ "$fstype" = cgroup2 ]; then
            mount -t cgroup2 cgroup2 "/sys/fs/cgroup/$dir" || echo "cgroup2 $dir not mounted"
        else
            mount -t cgroup -o "$opts" cgroup "/sys/fs/cgroup/$dir" || echo "cgroup $dir not mounted"
        fi
    done
fi

# Management network: static, never touched by NetworkManager (see NetworkManager.conf).
ip link set lo up
ip addr add "$TB_MGMT_CIDR" dev "$TB_MGMT_IF"
ip link set "$TB_MGMT_IF" up
ip route add default via "$TB_GATEWAY" dev "$TB_MGMT_IF"

dbus-daemon --system --fork
/lib/systemd/systemd-udevd --daemon
udevadm trigger --subsystem-match=net --action=add
udevadm settle --timeout=30

/usr/bin/python3 -I "$TB_LIBEXEC/gid_updater.py" "$TB_SIM_MOUNT" &

NetworkManager
/usr/sbin/sshd
# sshd forks into the background before it listens; "booted" means reachable.
for _ in $(seq 200); do
    [ -n "$(ss -Htln "sport = :22")" ] && break
    sleep 0.05
done

set +x
status booted
trap - ERR
set +e

# Reap whatever gets orphaned inside this PID namespace.
while :; do
    sleep 3600 &
    wait
done
