"""doctor, discover, bench: read-only checks and measurements."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from sparkctl import state
from sparkctl.cli import common as c
from sparkctl.doctor.evaluate import evaluate
from sparkctl.doctor.evaluators import CheckContext
from sparkctl.doctor.rules import Finding
from sparkctl.errors import EXIT_FAILED, HostError
from sparkctl.facts.discover import DISCOVER_PROBE, parse_discovery, propose_inventory
from sparkctl.inventory.models import FabricInterface, Host, SshSettings
from sparkctl.plan.bench import measure_jumbo
from sparkctl.runbook.engine import Report
from sparkctl.runbook.load import load_runbook, resolve_params

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
        if identity:
            state.refuse_exposed(identity, "--identity-file")
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
        mb: Annotated[int, typer.Option("--mb", help="MB sent over each link.")] = 512,
        accept_new_host_keys: c.AcceptKeysOpt = False,
        debug: c.DebugOpt = False,
    ) -> None:
        """Measure the link without RDMA tools: jumbo frames per twin, one TCP stream per link (said so)."""
        c.set_debug(debug)
        inv = c.inventory(inventory)
        rb = load_runbook("bench-fabric")
        params = resolve_params(rb, {"mb": str(mb)})
        session = c.open_session(inv, accept_new_host_keys)
        try:
            secrets = session.secrets_for_plan()
            report = session.apply(rb, session.plan(rb, params, secrets), params, secrets)
        finally:
            session.close()
        result = summarise_bench(report)
        if as_json:
            c.echo(json.dumps(result, indent=2))
        else:
            c.echo(f"method: {result['method']}")
            for link in result["links"]:
                rate = f", {link['mbytes_per_s']:.0f} MB/s (one TCP stream)" if link.get("mbytes_per_s") else ""
                c.echo(f"  {link['host']} {link['link']}: jumbo {'ok' if link['jumbo'] else 'FAILED'}{rate}")
            for note in result["notes"]:
                c.echo(f"note: {note}")
        if not report.ok:
            raise typer.Exit(EXIT_FAILED)


def summarise_bench(report: Report) -> dict[str, Any]:
    """Per link (host, twin -> peer): did jumbo frames cross, and the TCP stream's MB/s (from the sender's output)."""
    links: dict[tuple[str, str], dict[str, Any]] = {}
    for r in report.results:
        kind, _, link = r.step.partition(":")
        if kind == "verify_jumbo":
            links.setdefault((r.host, link), {"host": r.host, "link": link})["jumbo"] = r.status == "ok"
        elif kind == "bench_send" and r.commands:
            sent, _, secs = r.commands[-1].stdout.strip().partition(" ")
            rate = int(sent) / float(secs) / 1e6 if r.status == "ok" and secs else 0.0
            links.setdefault((r.host, link), {"host": r.host, "link": link})["mbytes_per_s"] = round(rate, 1)
    return {
        "method": "tcp-fallback",
        "links": [{"jumbo": False, **v} for v in links.values()],
        "notes": [
            "a fallback, not RoCE bandwidth: on a real pair run nccl-tests' all_gather_perf with the env file "
            "applied (two rails: ~20-24 GB/s busbw is good; ~3 GB/s at every size means a misconfigured link)"
        ],
        "journal": report.run_id,
    }
