#!/bin/bash
# Return one fake Spark (sparkctl testbed) to the state of a fresh install, from inside the host.
# Run by Testbed.reset_hosts() through nsenter. Parameters come from the environment (TB_*), so
# nothing matched by the pkill patterns below appears in this process's own command line.
set -u

: "${TB_TWINS:?}" "${TB_USER:?}" "${TB_RUNTIME:?}" "${TB_HOSTDIR:?}" "${TB_MGMT_IF:?}"
: "${TB_MGMT_CIDR:?}" "${TB_GATEWAY:?}"

kill_all() {  # pkill args...: SIGKILL until nothing matches (Ray respawns workers)
    for _ in 1 2 3 4 5 6 7 8 9 10; do
        pkill -KILL "$@" || return 0
        sleep 0.1
    done
}

# Processes: the login user's, anything running from the runtime venv, occupied ports.
kill_all -u "$TB_USER"
kill_all -f "$TB_RUNTIME/"
kill_all -f "testbed-occupy-port"

# NetworkManager as freshly installed: no profiles, no state; it recreates "Wired connection N".
pkill -TERM -x NetworkManager
for _ in $(seq 100); do pgrep -x NetworkManager >/dev/null || break; sleep 0.05; done
pkill -KILL -x NetworkManager
# read_only_nm_profiles() mounts the keyfile directory read-only over itself: undo it (it is no mount point else).
while mountpoint -q /etc/NetworkManager/system-connections; do umount /etc/NetworkManager/system-connections; done
rm -rf /etc/NetworkManager/system-connections/* /var/lib/NetworkManager/* /run/NetworkManager/*
# NetworkManager's checkpoints died with it; so does the record of one sparkctl opened.
rm -rf /run/sparkctl
rm -f /etc/NetworkManager/conf.d/*sparkctl*

for twin in $TB_TWINS; do
    ip -4 addr flush dev "$twin"
    ip link set "$twin" mtu 1500
    ip link set "$twin" up
    sysctl -qw "net.ipv6.conf.$twin.disable_ipv6=0"
done
ip addr replace "$TB_MGMT_CIDR" dev "$TB_MGMT_IF"
ip link set "$TB_MGMT_IF" mtu 1500 up
ip route replace default via "$TB_GATEWAY" dev "$TB_MGMT_IF"
nft flush ruleset

# Files sparkctl (or a test) may have left.
# containers (container mode): removed with their processes, from this host's own podman storage
if command -v podman >/dev/null 2>&1; then podman rm -af -t 0 >/dev/null 2>&1 || true; fi

rm -rf /etc/sparkctl /run/sudo/ts
find /run/lock -mindepth 1 -maxdepth 1 -name '*sparkctl*' -exec rm -rf {} +
find /tmp /dev/shm -mindepth 1 -maxdepth 1 -exec rm -rf {} +
home=$(getent passwd "$TB_USER" | cut -d: -f6)
find "$home" -mindepth 1 -maxdepth 1 ! -name .ssh ! -name .bashrc ! -name .profile \
    ! -name .bash_logout -exec rm -rf {} +

NetworkManager </dev/null >/dev/null 2>&1

# sshd: original host key, listener running.
key=/etc/ssh/ssh_host_ed25519_key
restart_sshd=0
if ! cmp -s "$key" "$TB_HOSTDIR/hostkey-orig/ssh_host_ed25519_key"; then
    cp "$TB_HOSTDIR/hostkey-orig/ssh_host_ed25519_key" "$key"
    cp "$TB_HOSTDIR/hostkey-orig/ssh_host_ed25519_key.pub" "$key.pub"
    chmod 600 "$key"
    restart_sshd=1
fi
pid=$(cat /run/sshd.pid 2>/dev/null || true)
if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    if [ "$restart_sshd" = 1 ]; then
        kill "$pid"
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
        /usr/sbin/sshd </dev/null >/dev/null 2>&1
    fi
else
    /usr/sbin/sshd </dev/null >/dev/null 2>&1
fi
# sshd forks into the background before it listens.
for _ in $(seq 200); do
    [ -n "$(ss -Htln "sport = :22")" ] && break
    sleep 0.05
done
exit 0
