"""A run against the hosts: connect through the one connect seam, probe, plan, apply, journal.

Every command that reaches a host goes through here: plans through the engine (`apply`), read-only steps
through `read` (doctor's pings, the sudo check, `logs`); runbook/discovery.py does the same for hosts that have
no inventory yet.
Tests replace the network once: `ssh_connect` below, or a `connect` given to the Session.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from sparkctl import state
from sparkctl.errors import HostError, Problem, SecretError, Unreachable
from sparkctl.execute.base import Connect, Endpoint, Transport
from sparkctl.execute.http import Probe, probe_workload
from sparkctl.facts.models import HostFacts
from sparkctl.inventory.models import Inventory, SshSettings
from sparkctl.plan.context import PlanContext
from sparkctl.plan.models import Command, Plan, Stage, Step
from sparkctl.runbook.engine import Engine, Event, Report, Secrets
from sparkctl.runbook.gather import gather_facts
from sparkctl.runbook.load import load_runbook, resolve_params
from sparkctl.runbook.models import Runbook
from sparkctl.runbook.planner import build_runbook_plan, plan_stage, sha256, worker_code

__all__ = ["Connect", "Session", "Unreachable", "open_session", "ssh_connect"]


def ssh_connect(accept_new_host_keys: bool) -> Connect:
    """The real connector: OpenSSH over Fabric with strict host keys (imports Fabric only when called)."""

    def connect(host: Endpoint, settings: SshSettings) -> Transport:
        from sparkctl.execute import ssh  # noqa: TID251 - the one place that builds the real connector

        return ssh.connect(host, settings, accept_new_host_keys=accept_new_host_keys)

    return connect


def silent(event: Event) -> None:
    """Read-only probes report through their caller, not as progress."""


def read_plan(cluster: str, name: str, steps: list[Step]) -> Plan:
    """Read-only steps as a one-stage plan (refuses a step that would change something)."""
    changing = [f"{s.host} {s.id}" for s in steps if s.changes]
    if changing:
        raise ValueError(f"read-only probe given changing steps: {', '.join(changing)}")
    hosts = list(dict.fromkeys(s.host for s in steps))
    return Plan(cluster=cluster, runbook=name, hosts=hosts, stages=[Stage(name=name, action=name, steps=steps)])


def run_read(engine: Engine, plan: Plan) -> Report:
    report = engine.run(plan)
    if report.interrupted:
        raise KeyboardInterrupt
    return report


@dataclass
class Session:
    """One run against one cluster: one connection per host, reused."""

    inventory: Inventory
    connect: Connect
    emit: Callable[[Event], None] = lambda e: None
    probe: Callable[..., Probe] = probe_workload
    """The HTTP readiness probe of workload endpoints (the engine's waits and `status`)."""
    transports: dict[str, Transport] = field(default_factory=dict)
    facts: dict[str, HostFacts] = field(default_factory=dict)

    def secrets_for_plan(self) -> dict[str, str]:
        """Laptop-side secrets every run may need: the Ray token and the workloads' API keys."""
        inv = self.inventory
        values = {"ray_token": state.ray_token(inv.cluster)}
        for w in inv.workloads:
            values[f"api_key:{w.name}"] = state.api_key(inv.cluster, w.name, w.api_key_env)
        return values

    def digests(self, secrets: Mapping[str, str]) -> dict[str, str]:
        return {"ray_token": sha256(secrets["ray_token"] + "\n"), "worker_code": sha256(worker_code())}

    def open(self) -> None:
        """Connect to and probe every host in parallel; raise Unreachable (changing nothing) if any fails."""
        names = [h.name for h in self.inventory.hosts]
        errors: dict[str, list[Problem]] = {}

        def conn(name: str) -> None:
            try:
                self.transports[name] = self.connect(self.inventory.host(name), self.inventory.ssh)
            except HostError as exc:
                errors[name] = [Problem(p.where or name, p.message, p.hint) for p in exc.problems]

        with ThreadPoolExecutor(max_workers=len(names)) as pool:
            list(pool.map(conn, names))
        if not errors:
            try:
                self.gather()
            except HostError:
                self.close()
                raise
            return
        self.close()
        raise Unreachable([p for n in names if n in errors for p in errors[n]], hint="nothing was changed on any host")

    def gather(self) -> None:
        """(Re-)probe every host."""
        found = gather_facts(self.inventory, self.transports)
        bad = {n: v for n, v in found.items() if isinstance(v, HostError)}
        if bad:
            raise Unreachable(
                [Problem(p.where or n, p.message, p.hint) for n, e in bad.items() for p in e.problems],
                hint="nothing was changed on any host",
            )
        self.facts = {n: v for n, v in found.items() if isinstance(v, HostFacts)}

    def context(self, secrets: Mapping[str, str], params: Mapping[str, Any]) -> PlanContext:
        return PlanContext(self.inventory, self.facts, params, self.digests(secrets))

    def plan(
        self,
        rb: Runbook,
        params: dict[str, Any],
        secrets: Mapping[str, str],
        *,
        start: int = 0,
        only: str | None = None,
    ) -> Plan:
        return build_runbook_plan(rb, self.context(secrets, params), params, start=start, only=only)

    def check_sudo(self, plan: Plan, password: Callable[[], str | None]) -> dict[str, str]:
        """Resolve the sudo password if a host needs one for this plan, and verify it there (fails fast)."""
        needs = sorted(
            {
                s.host
                for st in plan.stages
                for s in st.steps
                for c in s.commands
                if c.sudo and not self.facts[s.host].sudo_nopasswd
            }
        )
        if not needs:
            return {}
        pw = password()
        if not pw:
            env = self.inventory.sudo.password_env
            raise SecretError(
                [
                    Problem(
                        ", ".join(needs),
                        "sudo needs a password on these hosts",
                        f"set {env}, sudo.password_file, or run on a terminal to be asked once",
                    )
                ]
            )
        steps = [
            Step(
                host=host,
                kind="sudo_check",
                description="sudo accepts the password",
                changes=False,
                commands=[Command(argv=["true"], sudo=True, timeout=30)],
            )
            for host in needs
        ]
        report = self.read(steps, {"sudo_password": pw}, name="sudo")
        bad = [
            Problem(r.host, "sudo rejected the password", "check the password for the login user")
            for r in report.results
            if r.status == "failed"
        ]
        if bad:
            raise HostError(bad)
        return {"sudo_password": pw}

    def engine(self, secrets: Mapping[str, str], **options: Any) -> Engine:
        """The engine over this session's connections."""
        return Engine(
            transports=self.transports,
            nopasswd={n: f.sudo_nopasswd for n, f in self.facts.items()},
            secrets=Secrets(secrets),
            blobs={"worker_code": worker_code()},
            emit=options.pop("emit", self.emit),
            command_timeout=self.inventory.ssh.command_timeout,
            probe=self.probe,
            **options,
        )

    def read(
        self, steps: list[Step], secrets: Mapping[str, str] | None = None, *, name: str = "read", output_lines: int = 20
    ) -> Report:
        """Run read-only steps through the engine, silently, every host to the end (not journaled)."""
        plan = read_plan(self.inventory.cluster, name, steps)
        return run_read(self.engine(secrets or {}, emit=silent, keep_going=True, output_lines=output_lines), plan)

    def apply(
        self,
        rb: Runbook,
        plan: Plan,
        params: dict[str, Any],
        secrets: Mapping[str, str],
        *,
        confirm: Callable[[str], bool] = lambda m: True,
        start: int = 0,
    ) -> Report:
        """Run the plan; re-read the hosts after each changing stage; journal the run."""
        secrets = {**secrets, **rb.secret_values(params)}
        engine = self.engine(secrets, confirm=confirm)
        run_id = state.new_run_id()
        started = time.time()
        index = {s.name: i for i, s in enumerate(rb.steps)}

        def replan(done: frozenset[str], next_stage: int) -> Plan | None:
            if next_stage >= len(plan.stages):
                return None
            self.gather()
            first = index[plan.stages[next_stage].name]
            ctx = self.context(secrets, params).after(set(done))
            names = {st.name for st in plan.stages[next_stage:]}
            fresh = build_runbook_plan(rb, ctx, params, start=first)
            return fresh.model_copy(update={"stages": [st for st in fresh.stages if st.name in names]})

        def cleanup(names: list[str]) -> list[Stage]:
            self.gather()
            ctx = self.context(secrets, params)
            return [plan_stage(s, ctx, params) for s in rb.cleanup if s.name in names]

        report = engine.run(plan, replan=replan, cleanup=cleanup)
        report.run_id = run_id
        record = {
            "id": run_id,
            "cluster": plan.cluster,
            "runbook": rb.name,
            "started": started,
            "ended": time.time(),
            "ok": report.ok,
            "interrupted": report.interrupted,
            "params": {
                k: ("<redacted>" if rb.parameters.get(k) and rb.parameters[k].secret else v) for k, v in params.items()
            },
            "hosts": report.hosts,
            "revisions": report.revisions,
            "planned_changes": plan.changes,
            "steps": [r.model_dump() for r in report.results],
            "executed": [s.model_dump() for s in report.executed],
        }
        # Secret values (the token, API keys, the sudo password, `secret: true` parameters) may sit in the
        # commands as planned: the journal keeps none of them.
        state.append_journal(Secrets(secrets).scrub(record))
        if report.interrupted and rb.on_interrupt:
            self._after_interrupt(rb, params, secrets)
        return report

    def _after_interrupt(self, rb: Runbook, params: dict[str, Any], secrets: Mapping[str, str]) -> None:
        """Ctrl-C stopped `rb`: run what it declares under `on_interrupt:` (cleanup steps or built-in runbooks)."""
        self.emit(Event("note", message=f"interrupted: running {', '.join(rb.on_interrupt)} (on_interrupt)"))
        cleanup = {s.name: s for s in rb.cleanup}
        for ref in rb.on_interrupt:
            self.gather()
            if ref in cleanup:
                stage = plan_stage(cleanup[ref], self.context(secrets, params), params)
                plan = Plan(
                    cluster=self.inventory.cluster, runbook=rb.name, hosts=list(self.transports), stages=[stage]
                )
                self.engine(secrets).run(plan)
            else:
                other = load_runbook(ref)
                other_params = resolve_params(other, {})
                self.apply(other, self.plan(other, other_params, secrets), other_params, secrets)

    def close(self) -> None:
        for t in self.transports.values():
            with contextlib.suppress(Exception):
                t.close()
        self.transports.clear()


def open_session(inv: Inventory, accept_new_host_keys: bool, emit: Callable[[Event], None] | None = None) -> Session:
    """Connect to and probe every host (one SSH connection each, in parallel)."""
    session = Session(inv, ssh_connect(accept_new_host_keys), emit=emit or silent)
    session.open()
    return session
