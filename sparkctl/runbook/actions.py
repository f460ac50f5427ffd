"""The action library: each action maps a runbook step to per-host Steps (pure). Add an action = add a class."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import replace
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from sparkctl.inventory.models import Host
from sparkctl.plan import bench, env, fabric, images, ray_stages, serve_bench, weights, workload_stages
from sparkctl.plan.context import PlanContext
from sparkctl.plan.models import Command, Step


class NoArgs(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WorkloadArgs(NoArgs):
    workloads: list[str] | None = Field(None, description="workload names; default all")
    set: dict[str, Any] | None = Field(
        None, description="override workload fields for this step, e.g. {model: ..., gpu_memory_utilization: 0.75}"
    )


class DoctorArgs(NoArgs):
    categories: list[Literal["host", "gpu", "fabric", "memory", "flags", "ray"]] | None = None
    fail_on: Literal["fail", "warn"] = "fail"


class BenchArgs(NoArgs):
    mb: int = Field(256, ge=1, le=65536, description="MB sent per link")
    port: int = Field(5201, ge=1024, le=65535)


class BenchServeArgs(WorkloadArgs):
    prompts: int = Field(100, ge=1, le=1_000_000, description="requests sent (vllm bench serve --num-prompts)")
    input_len: int = Field(512, ge=1, le=1_048_576, description="prompt tokens per request (--random-input-len)")
    output_len: int = Field(128, ge=1, le=1_048_576, description="tokens generated per request (--random-output-len)")
    concurrency: int | None = Field(8, ge=1, description="requests in flight at most (--max-concurrency); null: all")
    request_rate: float | None = Field(
        None, gt=0, description="requests started per second (--request-rate); null: all at once (vLLM's inf)"
    )
    api: Literal["auto", "completions", "embeddings"] = Field(
        "auto", description="auto: /v1/embeddings for the embed worker, /v1/completions for vLLM"
    )
    source: str = Field("head", description="where the load generator runs: head (the workload's), laptop, a host")
    timeout: float = Field(1800, gt=0, le=86400, description="seconds the bench may take")

    @field_validator("workloads")
    @classmethod
    def _one(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and len(value) > 1:
            raise ValueError("name one workload per bench step: the steps of one stage run side by side")
        return value


ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class ShellArgs(NoArgs):
    argv: list[str] = Field(min_length=1, description="program and arguments, run verbatim (no shell)")
    env: dict[str, str] = Field(
        default_factory=dict,
        description='variables for the command, e.g. {TOKEN: "${token}"}: their values reach the host on stdin, '
        "never in a command line (the way for `secret: true` parameters)",
    )
    sudo: bool = False
    changes: bool = True
    description: str = ""

    @field_validator("env", mode="before")
    @classmethod
    def _env_text(cls, value: Any) -> Any:
        """A parameter without a value (null) is an empty line; numbers and booleans are their text."""
        if isinstance(value, dict):
            scalar = int | float | bool
            return {k: "" if v is None else str(v) if isinstance(v, scalar) else v for k, v in value.items()}
        return value

    @field_validator("env")
    @classmethod
    def _env(cls, value: dict[str, str]) -> dict[str, str]:
        for k, v in value.items():
            if not ENV_NAME.fullmatch(k):
                raise ValueError(f"'{k}' is not a variable name (letters, digits and _, not starting with a digit)")
            if any(c in v for c in "\n\r\0"):
                raise ValueError(f"the value of {k} must be one line")
        return value


class PauseArgs(NoArgs):
    message: str = "continue?"


class Action:
    """Base: `plan` returns this action's steps on one host."""

    name: ClassVar[str]
    help: ClassVar[str]
    Args: ClassVar[type[BaseModel]] = NoArgs
    needs_shell_opt_in: ClassVar[bool] = False
    commits: ClassVar[str] = ""
    """Name of the action whose change this one makes final (`--only` that action runs this one too)."""

    def plan(self, ctx: PlanContext, host: Host, args: Any) -> list[Step]:
        raise NotImplementedError


def _simple(
    name: str, help: str, fn: Callable[[PlanContext, Host], list[Step]], args: type[BaseModel] = NoArgs
) -> type[Action]:
    """An action that is one planner function."""

    def plan(self: Action, ctx: PlanContext, host: Host, a: Any) -> list[Step]:
        return fn(ctx, host)

    return type(
        f"{name.title().replace('_', '')}Action", (Action,), {"name": name, "help": help, "Args": args, "plan": plan}
    )


class FabricCommit(Action):
    name = "fabric_commit"
    help = "make the fabric change final: destroy the NetworkManager checkpoint the fabric step opened"
    commits = "fabric"

    def plan(self, ctx: PlanContext, host: Host, args: NoArgs) -> list[Step]:
        opens = fabric.CHECKPOINT_STEP in ctx.changed
        return fabric.plan_fabric_commit(ctx.inventory, host, ctx.facts[host.name], opens)


class Shell(Action):
    name = "shell"
    help = "run a command verbatim on the selected hosts (opt in with `shell: true` on the step)"
    Args = ShellArgs
    needs_shell_opt_in = True

    def plan(self, ctx: PlanContext, host: Host, args: ShellArgs) -> list[Step]:
        cmd = Command(argv=list(args.argv), sudo=args.sudo)
        shown = cmd.render() + (f" (env {', '.join(args.env)} on stdin)" if args.env else "")
        if args.env:
            # One line of stdin per variable, read by the shell into its environment, then the program in its place
            # (`exec "$@"`): the values never enter any process's argv. stdin is redacted like any secret output.
            reads = " && ".join(f"IFS= read -r {k} && export {k}" for k in args.env)
            cmd = Command(
                argv=["sh", "-c", f'{reads} && exec "$@"', "sh", *args.argv],
                sudo=args.sudo,
                stdin="".join(f"{v}\n" for v in args.env.values()),
            )
        return [
            Step(
                host=host.name,
                kind="shell",
                target=args.argv[0],
                description=args.description or f"run {shown}",
                commands=[cmd],
                changes=args.changes,
            )
        ]


class Doctor(Action):
    name = "doctor"
    help = "sparkctl doctor's rules on the facts (no jumbo pings: use verify_fabric); fails on a failed rule"
    Args = DoctorArgs

    def plan(self, ctx: PlanContext, host: Host, args: DoctorArgs) -> list[Step]:
        from sparkctl.doctor.evaluate import evaluate
        from sparkctl.doctor.evaluators import CheckContext

        cats = frozenset(args.categories) if args.categories else None
        found = evaluate(CheckContext(ctx.inventory, ctx.facts), categories=cats)
        mine = [
            f
            for f in found
            if f.subject.split(" ")[0] == host.name
            or (host.name == ctx.inventory.head.name and not f.subject.startswith(tuple(ctx.facts)))
        ]
        levels = ("fail",) if args.fail_on == "fail" else ("fail", "warn")
        bad = [f for f in mine if f.level in levels]
        if ctx.offline:
            return [
                Step(
                    host=host.name,
                    kind="doctor",
                    target=",".join(sorted(cats)) if cats else "all",
                    description=f"{len(mine)} check(s), judged on the hosts' real facts when run",
                    changes=False,
                    notes=["offline plan: the hosts were not read, so no verdict yet"],
                )
            ]
        return [
            Step(
                host=host.name,
                kind="doctor",
                target=",".join(sorted(cats)) if cats else "all",
                description=f"{len(mine)} check(s): {sum(f.level == 'pass' for f in mine)} passed",
                changes=False,
                notes=[f"{f.level} {f.rule} {f.subject}: {f.evidence}" for f in mine if f.level != "pass"],
                verdict="; ".join(f"{f.rule} {f.subject}: {f.evidence} (fix: {f.fix})" for f in bad),
            )
        ]


class BenchFabric(Action):
    name = "bench_fabric"
    help = "one TCP stream per link, first host to each peer (RDMA-free fallback; verify_fabric checks jumbo frames)"
    Args = BenchArgs

    def plan(self, ctx: PlanContext, host: Host, args: BenchArgs) -> list[Step]:
        return bench.plan_bench_fabric(replace(ctx, params={**ctx.params, "mb": args.mb, "port": args.port}), host)


class BenchServe(Action):
    name = "bench_serve"
    help = "vllm bench serve (upstream's load generator) against each selected workload; the JSON result kept"
    Args = BenchServeArgs

    def plan(self, ctx: PlanContext, host: Host, args: BenchServeArgs) -> list[Step]:
        params = args.model_dump(exclude={"set"}) | {"workloads": ctx.params.get("workloads")}
        return serve_bench.plan_bench_serve(replace(ctx, params={**ctx.params, **params}), host)


class Pause(Action):
    name = "pause"
    help = "ask the operator to confirm before going on"
    Args = PauseArgs

    def plan(self, ctx: PlanContext, host: Host, args: PauseArgs) -> list[Step]:
        if host.name != ctx.inventory.hosts[0].name:
            return []
        return [Step(host=host.name, kind="pause", description=args.message, changes=False)]


_ACTIONS: list[type[Action]] = [
    _simple(
        "fabric",
        "NetworkManager profiles with static IPv4 + MTU on the twins, activated",
        fabric.plan_fabric,
    ),
    FabricCommit,
    _simple("verify_fabric", "jumbo frames cross every twin both ways (ping -M do)", ray_stages.plan_verify_fabric),
    _simple(
        "worker_env",
        "per-host env file (GID index, NCCL/GLOO/UCX) + vLLM's Ray list",
        env.plan_worker_env,
    ),
    _simple(
        "peer_access",
        "container mode, when an image copy is due: the copying host's peer key, the targets' restricted access",
        images.plan_peer_access,
    ),
    _simple(
        "image_sync",
        "container mode: the image copied host to host over the fabric to every host without it (pulled if none has)",
        images.plan_image_copy,
    ),
    _simple("verify_image", "container mode: every host holds the image with the same ID", images.plan_image_check),
    _simple(
        "ray_image",
        "container mode with runtime.add_ray: the image derived with Ray on every host, when a workload needs Ray",
        images.plan_ray_image,
    ),
    _simple(
        "weights_fetch",
        "vllm with a Hugging Face id: the weights downloaded once, on one host of the group, verified",
        weights.plan_weights_fetch,
    ),
    _simple(
        "weights_copy",
        "the weights copied host to host over the fabric (rsync, resumable) to the group's other hosts",
        weights.plan_weights_copy,
    ),
    _simple(
        "weights_verify",
        "each copy checked against the source's file list, sizes and LFS sha256, and recorded",
        weights.plan_weights_verify,
    ),
    _simple("ray_firewall", "nftables: Ray reachable only over the fabric and loopback", ray_stages.plan_ray_firewall),
    _simple("ray_token", "the cluster's Ray auth token on every host", ray_stages.plan_ray_token),
    _simple("ray_start", "Ray head / workers on the fabric addresses", ray_stages.plan_ray_node),
    _simple("ray_ready", "wait until Ray shows every node", ray_stages.plan_ray_ready),
    _simple(
        "drop_caches",
        "sync + drop the page cache when weights are about to load",
        workload_stages.plan_drop_caches,
        WorkloadArgs,
    ),
    _simple("workload_start", "start workloads not running as specified", workload_stages.plan_workloads, WorkloadArgs),
    _simple("workload_ready", "wait until endpoints answer", workload_stages.plan_workload_ready, WorkloadArgs),
    _simple(
        "verify_placement",
        "the workloads' ranks sit on distinct hosts (Ray's placement groups)",
        workload_stages.plan_verify_placement,
        WorkloadArgs,
    ),
    _simple("workload_stop", "stop workloads (and strays)", workload_stages.plan_workload_stop, WorkloadArgs),
    _simple("ray_stop", "stop Ray", ray_stages.plan_ray_stop),
    _simple("verify_clean", "no Ray or worker process left", ray_stages.plan_verify_clean),
    _simple(
        "restore_network",
        "delete sparkctl profiles, re-enable the profiles it disabled",
        fabric.plan_restore_network,
    ),
    Shell,
    Pause,
    Doctor,
    BenchFabric,
    BenchServe,
]

ACTIONS: dict[str, Action] = {cls.name: cls() for cls in _ACTIONS}


def register(cls: type[Action]) -> type[Action]:
    """Add an action to the library (used by modules that define more actions)."""
    ACTIONS[cls.name] = cls()
    return cls
