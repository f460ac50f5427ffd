"""Fabric planner: one NetworkManager profile per twin (static IPv4, jumbo MTU), active, and no rival profile."""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from sparkctl import paths
from sparkctl.errors import PlanError, Problem
from sparkctl.facts.models import HostFacts, Interface, NmConnection
from sparkctl.facts.probe import NM_BUS
from sparkctl.inventory.models import FabricInterface, Host, Inventory
from sparkctl.inventory.topology import ring_routes, ring_source_policy
from sparkctl.plan.context import PlanContext
from sparkctl.plan.models import Command, Rollback, Step


@dataclass(frozen=True)
class TwinState:
    """A twin against the inventory: the one definition plan, status, watch and doctor share."""

    configured: bool
    """It holds the inventory's address and the fabric MTU: what the fabric step makes true."""
    up: bool
    """Its link is up (carrier): nothing sparkctl can change; a cable or the peer."""

    @property
    def ok(self) -> bool:
        """Configured and up: the twin can carry traffic as the inventory says."""
        return self.configured and self.up


def twin_state(twin: FabricInterface, live: Interface | None, mtu: int) -> TwinState:
    """How the netdev as read (None: not there) stands against the inventory's twin."""
    if live is None:
        return TwinState(configured=False, up=False)
    return TwinState(configured=str(twin.address) in live.ipv4 and live.mtu == mtu, up=live.up)


ACTIVATE_WAIT = "30"

# NetworkManager checkpoints (D-Bus API, introspection/org.freedesktop.NetworkManager.xml; CheckpointCreate,
# CheckpointDestroy and CheckpointRollback exist since NetworkManager 1.4 (NEWS), the flag below since 1.6; DGX OS /
# Ubuntu 24.04 ships 1.46, Debian 12 1.42). CheckpointCreate(ao devices, u rollback_timeout, u flags) -> o:
# NetworkManager snapshots each listed device (its active profile and that profile's settings) and, unless the
# checkpoint is destroyed first, rolls them back by itself after rollback_timeout seconds - even when sparkctl
# can no longer reach the host (src/core/nm-checkpoint.c: nm_checkpoint_rollback re-activates the snapshot's
# profile, or disconnects a device that had none).
CHECKPOINT_DELETE_NEW_CONNECTIONS = 0x02
"""NM_CHECKPOINT_CREATE_FLAG_DELETE_NEW_CONNECTIONS (nm-dbus-interface.h): a rollback deletes profiles added since."""

CHECKPOINT_STEP = "fabric_checkpoint"
COMMIT_STEP = "fabric_commit"


def _busctl(method: str, signature: str, *args: str) -> str:
    """`busctl call` of a NetworkManager method (systemd's busctl(1): SIGNATURE then one word per value,
    an array as its length followed by its items)."""
    return shlex.join(["busctl", "call", *NM_BUS, method, signature, *args])


def desired_settings(
    twin: FabricInterface, mtu: int, routes: tuple[list[str], list[str]] | None = None
) -> dict[str, str]:
    """The profile settings sparkctl ensures for a twin, in nmcli property names.

    `routes` (a ring's interfaces only; None elsewhere, where sparkctl leaves routes and rules alone): the static
    routes and routing rules the profile carries, as nmcli's ipv4.routes and ipv4.routing-rules take them
    (nm-settings-nmcli(5): ipv4.routes "ip[/prefix] [next-hop] [metric] [attribute=value]...", attributes such as
    table=N; ipv4.routing-rules "priority N from ADDR table N"; items comma separated; "" clears them).
    """
    want = {
        "connection.interface-name": twin.interface,
        "ipv4.method": "manual",
        "ipv4.addresses": str(twin.address),
        "ipv6.method": "disabled",
        "802-3-ethernet.mtu": str(mtu),
        "connection.autoconnect": "yes",
    }
    if routes is not None:
        want["ipv4.routes"] = ", ".join(routes[0])
        want["ipv4.routing-rules"] = ", ".join(routes[1])
    return want


def current_settings(con: NmConnection) -> dict[str, str]:
    """The same properties as they are on the host."""
    return {
        "connection.interface-name": con.interface_name,
        "ipv4.method": con.ipv4_method,
        "ipv4.addresses": ",".join(con.ipv4_addresses),
        "ipv4.routes": ", ".join(con.ipv4_routes),
        "ipv4.routing-rules": ", ".join(con.ipv4_routing_rules),
        "ipv6.method": con.ipv6_method,
        "802-3-ethernet.mtu": str(con.mtu) if con.mtu else "auto",
        "connection.autoconnect": "yes" if con.autoconnect else "no",
    }


def pick_profile(
    facts: HostFacts, name: str, interface: str, want: dict[str, str]
) -> tuple[NmConnection | None, list[NmConnection]]:
    """The profile called `name` sparkctl keeps, and its duplicates (same name, other UUIDs).

    Kept: the one active on the twin, else one already holding the wanted settings, else the first listed.
    """
    found = [c for c in facts.nm_connections if c.name == name]
    if not found:
        return None, []
    keep = next(
        (c for c in found if c.device == interface),
        next((c for c in found if _holds(current_settings(c), want)), found[0]),
    )
    return keep, [c for c in found if c.uuid != keep.uuid]


def _holds(have: dict[str, str], want: dict[str, str]) -> bool:
    return all(have.get(k) == v for k, v in want.items())


def twin_routes(inv: Inventory, host: Host, position: int) -> tuple[list[str], list[str]] | None:
    """(routes, routing rules) of hosts[..].fabric[position]'s profile on a ring (topology.ring_routes,
    topology.ring_source_policy); None for other topologies."""
    policy = ring_source_policy(inv, host, position)
    if policy is None:
        return None
    route, rule = policy
    return [route, *(f"{dest} {hop}" for dest, hop in ring_routes(inv, host).get(position, []))], [rule]


def check_session_safety(host: Host, facts: HostFacts) -> list[Problem]:
    """Refuse any twin that carries the SSH session (by route or by address)."""
    problems = []
    for j, twin in enumerate(host.fabric):
        live = facts.interfaces.get(twin.interface)
        carries = twin.interface == facts.ssh_interface or (
            live is not None and any(a.split("/")[0] == facts.ssh_server_ip for a in live.ipv4)
        )
        if carries:
            problems.append(
                Problem(
                    f"{host.name} fabric[{j}] {twin.interface}",
                    f"carries this SSH session ({facts.ssh_client_ip} -> {facts.ssh_server_ip}); "
                    "sparkctl never changes it",
                    "list only the ConnectX-7 twins under fabric; the management interface is reached, not configured",
                )
            )
        elif live is None and facts.interfaces:
            problems.append(
                Problem(
                    f"{host.name} fabric[{j}] {twin.interface}",
                    f"no such interface on the host (it has: {', '.join(sorted(facts.interfaces))})",
                    "fix the interface name (sparkctl discover lists the twins)",
                )
            )
    return problems


def plan_fabric(ctx: PlanContext, host: Host) -> list[Step]:
    """Steps that make every twin of `host` carry its address at the fabric MTU through a sparkctl profile.

    When anything changes, the first step opens a NetworkManager checkpoint on the twins; the change is final
    only after a later `fabric_commit` step (see plan_fabric_commit).
    """
    return _plan_fabric(ctx.inventory, host, ctx.facts[host.name])


def _plan_fabric(inv: Inventory, host: Host, facts: HostFacts) -> list[Step]:
    problems = check_session_safety(host, facts)
    if problems:
        raise PlanError(problems)
    steps: list[Step] = []
    for j, twin in enumerate(host.fabric):
        steps += _plan_twin(host.name, twin, inv.network.mtu, facts, twin_routes(inv, host, j))
    if steps or facts.nm_checkpoints.pending:  # another run's pending checkpoint fails the step (its verdict)
        steps.insert(0, _checkpoint_step(inv, host, facts, steps))
    return steps


def _checkpoint_step(inv: Inventory, host: Host, facts: HostFacts, changes: list[Step]) -> Step:
    """Open a checkpoint on the twins; its rollback undoes `changes` (NetworkManager's and, for profiles that
    were not active on a twin, sparkctl's own undo commands, which the checkpoint does not cover)."""
    cp = facts.nm_checkpoints
    timeout = inv.network.checkpoint_timeout
    devices = [cp.devices.get(t.interface, "") for t in host.fabric]
    file = shlex.quote(paths.CHECKPOINT_FILE)
    create = _busctl(
        "CheckpointCreate", "aouu", str(len(devices)), *devices, str(timeout), str(CHECKPOINT_DELETE_NEW_CONNECTIONS)
    )
    line = (
        f"mkdir -p {shlex.quote(paths.CHECKPOINT_FILE.rsplit('/', 1)[0])} && out=$({create}) && "
        f'echo "$out" | cut -d\\" -f 2 > {file}.new && mv {file}.new {file}'
    )
    verdict = ""
    missing = [t.interface for t, d in zip(host.fabric, devices, strict=True) if not d]
    if cp.pending:
        verdict = (
            f"NetworkManager holds a checkpoint of another sparkctl run ({cp.pending}): that run is still "
            f"changing the fabric, or it failed and NetworkManager rolls its change back within "
            f"{timeout} s; hint: wait for that run to end (or the rollback), then run again"
        )
    elif missing:
        verdict = (
            f"NetworkManager's D-Bus device of {', '.join(missing)} was not found (busctl call ... "
            "GetDeviceByIpIface); hint: check that busctl (systemd) is installed and NetworkManager manages the twins"
        )
    return Step(
        host=host.name,
        kind=CHECKPOINT_STEP,
        target=",".join(t.interface for t in host.fabric),
        description=f"open a NetworkManager checkpoint on the twins (rolls back by itself after {timeout} s "
        "unless committed)",
        commands=[Command(argv=["sh", "-c", line], sudo=True)],
        diff=[f"- {paths.CHECKPOINT_FILE}: absent", f"+ {paths.CHECKPOINT_FILE}: checkpoint path"],
        verdict=verdict,
        rollback=Rollback(
            commands=[_rollback_command(), *_undo_commands(host, facts, changes)],
            commit=COMMIT_STEP,
            description="roll the twins back to the checkpoint (profiles added by this run are deleted)",
            fallback=f"NetworkManager on {host.name} rolls the change back by itself when the checkpoint expires "
            f"({timeout} s after it was opened; network.checkpoint_timeout)",
        ),
    )


def _rollback_command() -> Command:
    """Roll back sparkctl's recorded checkpoint, if any; fail if a device could not be restored."""
    file = shlex.quote(paths.CHECKPOINT_FILE)
    line = (
        f'p=$(cat {file} 2>/dev/null); [ -n "$p" ] || exit 0; '
        f"out=$({_busctl('CheckpointRollback', 'o', 'PATH').replace('PATH', chr(34) + '$p' + chr(34))}); rc=$?; "
        f"rm -f {file}; "
        '[ $rc = 0 ] || { echo "NetworkManager no longer holds checkpoint $p (it expired and was rolled back, '
        'or NetworkManager restarted)" >&2; exit 1; }; '
        # the reply is a{su}: each device's original path and its NMRollbackResult (0 = restored)
        'echo "$out"; if echo "$out" | grep -q "\\" [1-3]"; then '
        'echo "NetworkManager could not restore every device" >&2; exit 1; fi'
    )
    return Command(argv=["sh", "-c", line], sudo=True)


def _undo_commands(host: Host, facts: HostFacts, changes: list[Step]) -> list[Command]:
    """nmcli commands restoring profiles this run modifies that were not active on a twin (a checkpoint restores
    only the profile active on each device; src/core/nm-checkpoint.c device_checkpoint_create)."""
    active = {d.connection for d in facts.nm_devices.values() if d.connection}
    undo: list[Command] = []
    for step in changes:
        if step.kind == "fabric_profile" and step.commands[0].argv[2] == "modify":
            name = step.commands[0].argv[4]
            ours = pick_profile(facts, name, step.target, {})[0]
            if ours is None or ours.name in active:
                continue
            have = current_settings(ours)
            argv = ["nmcli", "connection", "modify", "uuid", ours.uuid]
            for key in step.commands[0].argv[5::2]:
                argv += [key, "0" if key == "802-3-ethernet.mtu" and have[key] == "auto" else have[key]]
            undo.append(Command(argv=argv, sudo=True))
    return undo


def plan_rivals(host: Host, facts: HostFacts) -> list[Step]:
    """Stop other profiles from claiming the twins (autoconnect no), so the sparkctl profiles win after a reboot.

    Planned by the commit stage, after the checkpoint is destroyed: changing a profile saves it to disk (an
    automatic "Wired connection N" kept in /run moves to /etc), which a checkpoint rollback cannot undo
    (NetworkManager keeps a restored profile where it is: src/core/nm-checkpoint.c). Until then the rival only
    stands aside: it is deactivated when the sparkctl profile comes up, and an active device is not autoconnected.
    """
    steps: list[Step] = []
    for twin in host.fabric:
        name = paths.connection_name(twin.interface)
        rivals = [c for c in facts.nm_connections if c.name != name and twin.interface in (c.interface_name, c.device)]
        for rival in rivals:
            if not rival.autoconnect:
                continue
            steps.append(
                Step(
                    host=host.name,
                    kind="fabric_rival_profile",
                    target=f"{twin.interface}/{rival.name}",
                    description=f"stop profile '{rival.name}' from claiming {twin.interface} (autoconnect)",
                    commands=[
                        Command(
                            argv=["nmcli", "connection", "modify", "uuid", rival.uuid, "connection.autoconnect", "no"],
                            sudo=True,
                        )
                    ],
                    diff=[f"- {rival.name}: connection.autoconnect yes", f"+ {rival.name}: connection.autoconnect no"],
                    notes=["`sparkctl restore-network` re-enables it"],
                )
            )
    return steps


def plan_fabric_commit(inv: Inventory, host: Host, facts: HostFacts, run_opens: bool) -> list[Step]:
    """Destroy this run's checkpoint on a host (the fabric change becomes final).

    `run_opens`: an earlier stage of this run opens checkpoints. Before that stage runs, the host's own fabric
    plan says whether it gets one; after it, the facts show the checkpoint pending.
    """
    rivals = plan_rivals(host, facts)
    if not run_opens:
        return rivals
    pending = bool(facts.nm_checkpoints.pending)
    opened = pending or bool(_plan_fabric(inv, host, facts))
    if not opened:
        return rivals
    file = shlex.quote(paths.CHECKPOINT_FILE)
    timeout = inv.network.checkpoint_timeout
    line = (
        f'p=$(cat {file} 2>/dev/null); [ -n "$p" ] || {{ echo "no checkpoint recorded in {paths.CHECKPOINT_FILE}" '
        ">&2; exit 1; }; "
        f"{_busctl('CheckpointDestroy', 'o', 'PATH').replace('PATH', chr(34) + '$p' + chr(34))} >/dev/null || "
        f'{{ rm -f {file}; echo "NetworkManager no longer holds checkpoint $p: the fabric change was rolled back '
        f"(it expired after network.checkpoint_timeout={timeout} s, before the checks ended, or NetworkManager "
        f'restarted); hint: raise network.checkpoint_timeout and run again" >&2; exit 1; }}; rm -f {file}'
    )
    return [
        Step(
            host=host.name,
            kind=COMMIT_STEP,
            target=paths.CHECKPOINT_FILE,
            description="commit the fabric change (destroy the NetworkManager checkpoint)",
            commands=[Command(argv=["sh", "-c", line], sudo=True)],
            diff=[f"- checkpoint: rolls back after {timeout} s", "+ checkpoint: none (the change is final)"],
            depends_on_earlier=not pending,
        ),
        *rivals,
    ]


def _plan_twin(
    hostname: str, twin: FabricInterface, mtu: int, facts: HostFacts, routes: tuple[list[str], list[str]] | None = None
) -> list[Step]:
    name = paths.connection_name(twin.interface)
    want = desired_settings(twin, mtu, routes)
    ours, extra = pick_profile(facts, name, twin.interface, want)
    duplicates = _duplicate_steps(hostname, name, twin, ours, extra)
    profile = _profile_steps(hostname, name, twin, mtu, want, ours)
    return duplicates + profile + _activate_steps(hostname, name, twin, mtu, facts, changed_profile=bool(profile))


def _duplicate_steps(
    hostname: str, name: str, twin: FabricInterface, ours: NmConnection | None, extra: list[NmConnection]
) -> list[Step]:
    """Two runs at once (or a profile copied by hand) leave several profiles of one name: `nmcli ... id NAME` then
    acts on whichever NetworkManager lists first. Keep one, delete the others by UUID, before any change."""
    steps = []
    for dup in extra:
        where = f", active on {dup.device}" if dup.device else ""
        steps.append(
            Step(
                host=hostname,
                kind="fabric_duplicate_profile",
                target=f"{twin.interface}/{dup.uuid}",
                description=f"delete the duplicate profile {name} ({dup.uuid}{where}); {ours.uuid if ours else ''} "
                "stays",
                commands=[Command(argv=["nmcli", "connection", "delete", "uuid", dup.uuid], sudo=True)],
                diff=[f"- {name} {dup.uuid}{(' ' + dup.filename) if dup.filename else ''}"],
            )
        )
    return steps


def _profile_steps(
    hostname: str, name: str, twin: FabricInterface, mtu: int, want: dict[str, str], ours: NmConnection | None
) -> list[Step]:
    """The twin's profile created, or the settings that differ from `want` modified; nothing when it matches."""
    if ours is None:
        argv = ["nmcli", "connection", "add", "type", "ethernet", "con-name", name, "ifname", twin.interface]
        for key, value in want.items():
            if key != "connection.interface-name" and value:
                argv += [key, value]
        return [
            Step(
                host=hostname,
                kind="fabric_profile",
                target=twin.interface,
                description=f"create profile {name}: {twin.address}, MTU {mtu}, IPv6 off"
                + (f", routes {want['ipv4.routes']}" if want.get("ipv4.routes") else ""),
                commands=[Command(argv=argv, sudo=True)],
                diff=[f"+ {name}: {k} {v}" for k, v in want.items() if v],
            )
        ]
    have = current_settings(ours)
    differ = {k: v for k, v in want.items() if have.get(k) != v}
    if not differ:
        return []
    argv = ["nmcli", "connection", "modify", "id", name]  # unambiguous: duplicates are deleted first
    for key, value in differ.items():
        argv += [key, value]
    diff = []
    for k, v in differ.items():
        diff += [f"- {name}: {k} {have.get(k) or '--'}", f"+ {name}: {k} {v}"]
    return [
        Step(
            host=hostname,
            kind="fabric_profile",
            target=twin.interface,
            description=f"update profile {name}: {', '.join(differ)}",
            commands=[Command(argv=argv, sudo=True)],
            diff=diff,
        )
    ]


def _activate_steps(
    hostname: str, name: str, twin: FabricInterface, mtu: int, facts: HostFacts, *, changed_profile: bool
) -> list[Step]:
    """The profile brought up on the twin when it changed, another profile is active there, or the link does not
    show the twin's address and MTU."""
    live = facts.interfaces.get(twin.interface)
    device = facts.nm_devices.get(twin.interface)
    active_con = device.connection if device else ""
    live_ok = twin_state(twin, live, mtu).configured  # a link that is down is not the profile's to fix
    if not (changed_profile or active_con != name or not live_ok):
        return []
    before = (
        f"{twin.interface}: {','.join(live.ipv4) or 'no IPv4'}, MTU {live.mtu}, profile {active_con or '--'}"
        if live
        else f"{twin.interface}: unknown"
    )
    return [
        Step(
            host=hostname,
            kind="fabric_active",
            target=twin.interface,
            description=f"activate {name} on {twin.interface}",
            commands=[Command(argv=["nmcli", "--wait", ACTIVATE_WAIT, "connection", "up", "id", name], sudo=True)],
            diff=[f"- {before}", f"+ {twin.interface}: {twin.address}, MTU {mtu}, profile {name}"],
        )
    ]


def plan_restore_network(ctx: PlanContext, host: Host) -> list[Step]:
    """Undo the fabric: delete sparkctl profiles, hand the twins back to the profiles sparkctl disabled."""
    facts = ctx.facts[host.name]
    problems = [p for p in check_session_safety(host, facts) if "carries" in p.message]
    if problems:
        raise PlanError(problems)
    steps: list[Step] = []
    for twin in host.fabric:
        name = paths.connection_name(twin.interface)
        mine = [c for c in facts.nm_connections if c.name == name]
        if mine:
            steps.append(
                Step(
                    host=host.name,
                    kind="fabric_profile_removed",
                    target=twin.interface,
                    description=f"delete profile {name}" + (f" ({len(mine)} copies)" if len(mine) > 1 else ""),
                    commands=[Command(argv=["nmcli", "connection", "delete", "uuid", c.uuid], sudo=True) for c in mine]
                    if len(mine) > 1
                    else [Command(argv=["nmcli", "connection", "delete", "id", name], sudo=True)],
                    diff=[f"- {name}"],
                )
            )
        for rival in facts.nm_connections:
            if rival.name == name or twin.interface not in (rival.interface_name, rival.device) or rival.autoconnect:
                continue
            steps.append(
                Step(
                    host=host.name,
                    kind="fabric_rival_restored",
                    target=f"{twin.interface}/{rival.name}",
                    description=f"give {twin.interface} back to profile '{rival.name}'",
                    commands=[
                        Command(
                            argv=["nmcli", "connection", "modify", "uuid", rival.uuid, "connection.autoconnect", "yes"],
                            sudo=True,
                        )
                    ],
                    diff=[f"- {rival.name}: connection.autoconnect no", f"+ {rival.name}: connection.autoconnect yes"],
                    notes=["NetworkManager activates it on its own once the sparkctl profile is gone"],
                )
            )
    return steps
