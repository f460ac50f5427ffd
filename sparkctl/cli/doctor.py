"""doctor, discover, bench: read-only checks and measurements."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from sparkctl.checks.active import measure_jumbo, tcp_throughput
from sparkctl.checks.discover import DISCOVER_PROBE, parse_discovery, propose_inventory
from sparkctl.checks.doctor import evaluate
from sparkctl.checks.evaluators import CheckContext
from sparkctl.checks.rules import Finding
from sparkctl.cli import common as c
from sparkctl.errors import EXIT_FAILED, HostError
from sparkctl.inventory.models import FabricInterface, Host, SshSettings
from sparkctl.runbook.run import Session

MARK = {"pass": "pass", "warn": "WARN", "fail": "FAIL"}


def render_findings(findings: list[Finding], verbose: bool = False) -> str:
    lines = []
    for f in findings:
        if f.level == "pass" and not verbose:
            continue
        lines.append(f"{MARK[f.level]:4} {f.rule:24} {f.subject}: {f.evidence}")
        if f.level != "pass":
            lines.append(f"     why: {f.why}")
            lines.append(f"     fix: {f.fix}")
    counts = {lvl: sum(1 for f in findings if f.level == lvl) for lvl in ("pass", "warn", "fail")}
    lines.append(f"{counts['pass']} passed, {counts['warn']} warning(s), {counts['fail']} failed")
    return "\n".join(lines)


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    @app.command("doctor")
    @c.guard
    def doctor_cmd(
        inventory: c.InventoryOpt = None,
        as_json: c.JsonOpt = False,
        verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show passed checks too.")] = False,
        accept_new_host_keys: c.AcceptKeysOpt = False,
        debug: c.DebugOpt = False,
    ) -> None:
        """Read-only checks on every host and across the pair: pass / warn / fail, evidence and fix."""
        c.set_debug(debug)
        inv = c.inventory(inventory)
        session = c.open_session(inv, accept_new_host_keys)
        try:
            pings = measure_jumbo(inv, session.facts, session.transports)
            findings = evaluate(CheckContext(inv, session.facts, pings))
        finally:
            session.close()
        if as_json:
            c.echo(json.dumps([f.model_dump() for f in findings], indent=2))
        else:
            c.echo(render_findings(findings, verbose))
        if any(f.level == "fail" for f in findings):
            raise typer.Exit(EXIT_FAILED)

    @app.command("discover")
    @c.guard
    def discover_cmd(
        hosts: Annotated[list[str], typer.Argument(help="Management addresses of the Sparks.")],
        user: Annotated[str | None, typer.Option("--user", "-u")] = None,
        port: Annotated[int | None, typer.Option("--port", "-p")] = None,
        identity: Annotated[str | None, typer.Option("--identity-file")] = None,
        known_hosts: Annotated[str, typer.Option("--known-hosts")] = "~/.ssh/known_hosts",
        cluster: Annotated[str, typer.Option("--cluster")] = "spark-pair",
        output: Annotated[Path | None, typer.Option("--output", "-o")] = None,
        accept_new_host_keys: c.AcceptKeysOpt = False,
        debug: c.DebugOpt = False,
    ) -> None:
        """Connect to the given hosts and write a complete inventory for them."""
        c.set_debug(debug)
        from sparkctl.execute import ssh

        settings = SshSettings(user=user, port=port, identity_file=identity, known_hosts=known_hosts)
        found = []
        problems = []
        for i, addr in enumerate(hosts):
            # discover only needs the address and SSH settings; the fabric entry is a placeholder
            host = Host(name=f"host{i}", address=addr, fabric=[FabricInterface(interface="lo", address="127.0.0.1/8")])
            try:
                t = ssh.connect(host, settings, accept_new_host_keys=accept_new_host_keys)
            except HostError as exc:
                problems += exc.problems
                continue
            try:
                r = t.run("sh -s", stdin=DISCOVER_PROBE, timeout=60)
            finally:
                t.close()
            found.append(parse_discovery(addr, r.stdout))
        if problems:
            raise HostError(problems)
        used = {
            "user": user,
            "port": port,
            "identity_file": identity,
            "known_hosts": known_hosts if known_hosts != "~/.ssh/known_hosts" else None,
        }
        text, unknown = propose_inventory(found, cluster, used)
        for u in unknown:
            c.echo(f"warning: could not determine: {u}", err=True)
        if output:
            output.write_text(text)
            c.echo(f"wrote {output}", err=True)
        else:
            c.echo(text.rstrip())

    @bench_app.command("fabric")
    @c.guard
    def bench_fabric(
        inventory: c.InventoryOpt = None,
        as_json: c.JsonOpt = False,
        mb: Annotated[int, typer.Option("--mb", help="MB sent per link in the TCP fallback.")] = 512,
        accept_new_host_keys: c.AcceptKeysOpt = False,
        debug: c.DebugOpt = False,
    ) -> None:
        """Measure the link: RDMA/NCCL tools where present, else a TCP + jumbo-MTU fallback (said so)."""
        c.set_debug(debug)
        inv = c.inventory(inventory)
        session = c.open_session(inv, accept_new_host_keys)
        try:
            result = _bench(session, mb)
        finally:
            session.close()
        if as_json:
            c.echo(json.dumps(result, indent=2))
        else:
            c.echo(f"method: {result['method']}")
            for link in result["links"]:
                c.echo(
                    f"  {link['link']}: jumbo {'ok' if link['jumbo'] else 'FAILED'}"
                    + (f", {link['mbytes_per_s']:.0f} MB/s (one TCP stream)" if "mbytes_per_s" in link else "")
                )
            for note in result["notes"]:
                c.echo(f"note: {note}")
        if not all(link["jumbo"] for link in result["links"]):
            raise typer.Exit(EXIT_FAILED)


def _bench(session: Session, mb: int) -> dict[str, Any]:
    inv = session.inventory
    head = session.transports[inv.head.name]
    have_rdma = head.run("command -v ib_write_bw all_gather_perf", timeout=10).ok
    pings = measure_jumbo(inv, session.facts, session.transports)
    notes = []
    links = []
    if have_rdma:
        notes.append(
            "ib_write_bw/nccl-tests found: run `all_gather_perf -b 1G -e 1G` with the env file for busbw; "
            "expect ~20-24 GB/s on a good pair, ~3 GB/s at every size means a misconfigured link"
        )
    notes.append(
        "RDMA tools are absent or not used here: measured one TCP stream per twin and the jumbo path "
        "(this is a fallback, not RoCE bandwidth)"
    )
    python = f"{inv.runtime.venv}/bin/python" if inv.runtime.venv else "python3"
    tcp = tcp_throughput(inv, session.transports, python, mb=mb)
    for (host, iface, peer), (ok, detail) in sorted(pings.items()):
        entry: dict[str, object] = {"link": f"{host} {iface} -> {peer}", "jumbo": ok, "detail": detail}
        if (host, iface, peer) in tcp:
            entry["mbytes_per_s"] = round(tcp[(host, iface, peer)], 1)
        links.append(entry)
    return {
        "method": "tcp-fallback" if not have_rdma else "tcp-fallback (rdma tools present)",
        "links": links,
        "notes": notes,
    }
