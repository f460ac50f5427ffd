"""Fabric planner: one NetworkManager profile per twin (static IPv4, jumbo MTU), active, and no rival profile."""

from __future__ import annotations

from sparkctl import paths
from sparkctl.errors import PlanError, Problem
from sparkctl.facts.models import HostFacts, NmConnection
from sparkctl.inventory.models import FabricInterface, Host
from sparkctl.plan.context import PlanContext
from sparkctl.plan.models import Command, Step

ACTIVATE_WAIT = "30"


def desired_settings(twin: FabricInterface, mtu: int) -> dict[str, str]:
    """The profile settings sparkctl ensures for a twin, in nmcli property names."""
    return {
        "connection.interface-name": twin.interface,
        "ipv4.method": "manual",
        "ipv4.addresses": str(twin.address),
        "ipv6.method": "disabled",
        "802-3-ethernet.mtu": str(mtu),
        "connection.autoconnect": "yes",
    }


def current_settings(con: NmConnection) -> dict[str, str]:
    """The same properties as they are on the host."""
    return {
        "connection.interface-name": con.interface_name,
        "ipv4.method": con.ipv4_method,
        "ipv4.addresses": ",".join(con.ipv4_addresses),
        "ipv6.method": con.ipv6_method,
        "802-3-ethernet.mtu": str(con.mtu) if con.mtu else "auto",
        "connection.autoconnect": "yes" if con.autoconnect else "no",
    }


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
    """Steps that make every twin of `host` carry its address at the fabric MTU through a sparkctl profile."""
    inv, facts = ctx.inventory, ctx.facts[host.name]
    problems = check_session_safety(host, facts)
    if problems:
        raise PlanError(problems)
    steps: list[Step] = []
    for twin in host.fabric:
        steps += _plan_twin(host.name, twin, inv.network.mtu, facts)
    return steps


def _plan_twin(hostname: str, twin: FabricInterface, mtu: int, facts: HostFacts) -> list[Step]:
    name = paths.connection_name(twin.interface)
    same = [c for c in facts.nm_connections if c.name == name]
    # Two profiles of one name (two runs that raced, or a hand-made copy) is drift: keep the one active on the
    # twin (else the first), delete the others by UUID, so that `nmcli ... id NAME` names exactly one again.
    ours = next((c for c in same if c.device == twin.interface), same[0] if same else None)
    want = desired_settings(twin, mtu)
    steps: list[Step] = [
        Step(
            host=hostname,
            kind="fabric_duplicate_profile",
            target=f"{twin.interface}/{dup.uuid}",
            description=f"delete duplicate profile {name} ({dup.uuid}); keep {ours.uuid if ours else '--'}",
            commands=[Command(argv=["nmcli", "connection", "delete", "uuid", dup.uuid], sudo=True)],
            diff=[f"- {name}: {dup.uuid}" + (f" (active on {dup.device})" if dup.device else "")],
        )
        for dup in same
        if dup is not ours
    ]

    rivals = [c for c in facts.nm_connections if c.name != name and twin.interface in (c.interface_name, c.device)]
    for rival in rivals:
        if not rival.autoconnect:
            continue
        active = " and is deactivated when the sparkctl profile comes up" if rival.device == twin.interface else ""
        steps.append(
            Step(
                host=hostname,
                kind="fabric_rival_profile",
                target=f"{twin.interface}/{rival.name}",
                description=f"stop profile '{rival.name}' from claiming {twin.interface}{active}",
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

    if ours is None:
        argv = ["nmcli", "connection", "add", "type", "ethernet", "con-name", name, "ifname", twin.interface]
        for key, value in want.items():
            if key != "connection.interface-name":
                argv += [key, value]
        steps.append(
            Step(
                host=hostname,
                kind="fabric_profile",
                target=twin.interface,
                description=f"create profile {name}: {twin.address}, MTU {mtu}, IPv6 off",
                commands=[Command(argv=argv, sudo=True)],
                diff=[f"+ {name}: {k} {v}" for k, v in want.items()],
            )
        )
        changed_profile = True
    else:
        have = current_settings(ours)
        differ = {k: v for k, v in want.items() if have.get(k) != v}
        changed_profile = bool(differ)
        if differ:
            argv = ["nmcli", "connection", "modify", "id", name]
            for key, value in differ.items():
                argv += [key, value]
            diff = []
            for k, v in differ.items():
                diff += [f"- {name}: {k} {have.get(k) or '--'}", f"+ {name}: {k} {v}"]
            steps.append(
                Step(
                    host=hostname,
                    kind="fabric_profile",
                    target=twin.interface,
                    description=f"update profile {name}: {', '.join(differ)}",
                    commands=[Command(argv=argv, sudo=True)],
                    diff=diff,
                )
            )

    live = facts.interfaces.get(twin.interface)
    device = facts.nm_devices.get(twin.interface)
    active_con = device.connection if device else ""
    live_ok = live is not None and live.mtu == mtu and str(twin.address) in live.ipv4
    if changed_profile or active_con != name or not live_ok:
        before = (
            f"{twin.interface}: {','.join(live.ipv4) or 'no IPv4'}, MTU {live.mtu}, profile {active_con or '--'}"
            if live
            else f"{twin.interface}: unknown"
        )
        steps.append(
            Step(
                host=hostname,
                kind="fabric_active",
                target=twin.interface,
                description=f"activate {name} on {twin.interface}",
                commands=[Command(argv=["nmcli", "--wait", ACTIVATE_WAIT, "connection", "up", "id", name], sudo=True)],
                diff=[f"- {before}", f"+ {twin.interface}: {twin.address}, MTU {mtu}, profile {name}"],
            )
        )
    return steps


def plan_restore_network(ctx: PlanContext, host: Host) -> list[Step]:
    """Undo the fabric: delete sparkctl profiles, hand the twins back to the profiles sparkctl disabled."""
    facts = ctx.facts[host.name]
    problems = [p for p in check_session_safety(host, facts) if "carries" in p.message]
    if problems:
        raise PlanError(problems)
    steps: list[Step] = []
    for twin in host.fabric:
        name = paths.connection_name(twin.interface)
        if facts.connection(name):
            steps.append(
                Step(
                    host=host.name,
                    kind="fabric_profile_removed",
                    target=twin.interface,
                    description=f"delete profile {name}",
                    commands=[Command(argv=["nmcli", "connection", "delete", "id", name], sudo=True)],
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
