"""Rules on the workloads: health, memory fit, vLLM flags and the packages or versions they need."""

from __future__ import annotations

import contextlib
import re

from sparkctl.doctor.evaluators.core import CheckContext, _f, _hosts, evaluator
from sparkctl.doctor.rules import Finding, Rule
from sparkctl.inventory.models import Workload
from sparkctl.plan.env import version_tuple
from sparkctl.plan.layout import rank_hosts
from sparkctl.plan.live_state import workload_exit


@evaluator("workload_health")
def workload_health(ctx: CheckContext, rule: Rule) -> list[Finding]:
    out: list[Finding] = []
    inv = ctx.inventory
    for w in inv.workloads:
        # its head, and each host running a rank of vLLM's multiprocessing executor (a headless `vllm serve`)
        hosts = dict.fromkeys([inv.workload_head(w).name, *(h.name for h in rank_hosts(inv, w))])
        for name in hosts:
            f = ctx.facts.get(name)
            if f is None or not {f"workload-{w.name}.pid", f"workload-{w.name}.spec"} & f.files.keys():
                continue  # not running there: nothing to judge
            exited = workload_exit(f.files, w.name)
            health = f"failed exited by itself: {exited}" if exited is not None else None
            health = health or f.files.get(f"workload-{w.name}.health", "").strip()
            out.append(
                _f(rule, not health.startswith("failed"), f"{name} workload {w.name}", health or "no health recorded")
            )
    return out


_SIZE = re.compile(r"(\d+(?:\.\d+)?)[bB](?![a-zA-Z])")


def estimate_weights_gb(model: str) -> float | None:
    """Rough weight size from a model name: parameters (e.g. '30B') times bytes per parameter by dtype hints."""
    sizes = [float(x) for x in _SIZE.findall(model.split("/")[-1])]
    if not sizes:
        return None
    params = max(sizes)
    lower = model.lower()
    if any(k in lower for k in ("awq", "gptq", "int4", "4bit", "nvfp4", "mxfp4", "fp4", "gpt-oss")):
        per = 0.55
    elif any(k in lower for k in ("fp8", "int8", "8bit")):
        per = 1.05
    else:
        per = 2.0
    return params * per


@evaluator("memory_fit")
def memory_fit(ctx: CheckContext, rule: Rule) -> list[Finding]:
    out = []
    for w in ctx.inventory.workloads:
        if w.engine != "vllm":
            continue
        need = estimate_weights_gb(w.model)
        if need is None:
            continue
        per_rank = need / w.tensor_parallel_size
        budget = rule.args["unified_gb"] * w.gpu_memory_utilization
        out.append(
            _f(
                rule,
                per_rank < budget * 0.9,
                f"workload {w.name}",
                f"~{need:.0f} GB of weights, ~{per_rank:.0f} GB per rank vs {budget:.0f} GB "
                f"({w.gpu_memory_utilization:g} of {rule.args['unified_gb']} GB)",
            )
        )
    return out


def _arg_value(w: Workload, flag: str) -> str | None:
    args = w.extra_args
    for i, a in enumerate(args):
        if a == flag:
            nxt = args[i + 1] if i + 1 < len(args) else ""
            return "" if nxt.startswith("--") else nxt
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


@evaluator("utilization_flag")
def utilization_flag(ctx: CheckContext, rule: Rule) -> list[Finding]:
    out = []
    for w in ctx.inventory.workloads:
        values = [w.gpu_memory_utilization]
        extra = _arg_value(w, "--gpu-memory-utilization")
        if extra:
            with contextlib.suppress(ValueError):
                values.append(float(extra))
        top = max(values)
        out.append(_f(rule, top <= rule.args["max"], f"workload {w.name}", f"gpu_memory_utilization {top:g}"))
    return out


@evaluator("workload_flag")
def workload_flag(ctx: CheckContext, rule: Rule) -> list[Finding]:
    out = []
    flag, want = rule.args["flag"], rule.args.get("value")
    for w in ctx.inventory.workloads:
        if w.engine != "vllm":
            continue
        value = _arg_value(w, flag)
        # args.exact: the value is the named choice itself (`--moe-backend cutlass`, not `flashinfer_cutlass`, a
        # different choice of the same flag); otherwise a substring (`--attention-backend FLASHINFER...`).
        if value is None or want is None:
            flag_hit = value is not None
        elif rule.args.get("exact"):
            flag_hit = value.lower() == want.lower()
        else:
            flag_hit = want.lower() in value.lower()
        value_hit = flag_hit
        if flag_hit and rule.args.get("contains"):
            flag_hit = rule.args["contains"] in " ".join([w.model, *w.extra_args]).lower()
        env_hits = [k for k, v in (rule.args.get("env") or {}).items() if w.env.get(k, "").upper() == v]
        hit = flag_hit or bool(env_hits)
        if flag_hit:
            evidence = f"{flag}{'=' + value if value else ''} in extra_args"
        elif env_hits:
            evidence = f"set through the environment ({', '.join(env_hits)})"
        elif value_hit:
            evidence = f"{flag} {value}, but no {rule.args['contains']} in the model or its flags"
        elif value:
            evidence = f"{flag} {value} (not {want})"
        else:
            evidence = f"no {flag}"
        out.append(_f(rule, not hit, f"workload {w.name}", evidence, fix=versioned_fix(rule, _vllm_version(ctx))))
    return out


def _vllm_version(ctx: CheckContext) -> str:
    head = ctx.facts.get(ctx.inventory.head.name)
    return head.runtime.vllm if head else ""


def versioned_fix(rule: Rule, vllm: str) -> str | None:
    """The fix for the head's vLLM version when the rule's fix depends on it (args.fix_by_vllm: entries with
    `before: <version>` are tried in order, the last one without `before` applies otherwise). Unknown version:
    every variant, each with its range."""
    variants = rule.args.get("fix_by_vllm")
    if not variants:
        return None
    if not vllm:
        return "; ".join(f"{'vLLM < ' + v['before'] if 'before' in v else 'newer vLLM'}: {v['fix']}" for v in variants)
    for v in variants:
        if "before" not in v or version_tuple(vllm) < version_tuple(str(v["before"])):
            return str(v["fix"])
    return None


@evaluator("load_format_package")
def load_format_package(ctx: CheckContext, rule: Rule) -> list[Finding]:
    """`--load-format <x>` names a loader whose optional package (`args.package`) must be in every host's runtime:
    vLLM imports it lazily (`vllm/model_executor/model_loader/weight_utils.py`: PlaceholderModule), so a missing
    package is an ImportError at weight loading, not at start."""
    out = []
    flag, want, field = rule.args["flag"], rule.args["value"], rule.args["package"]
    for w in ctx.inventory.workloads:
        if w.engine != "vllm":
            continue
        value = _arg_value(w, flag)
        if value is None or value.lower() != want:
            out.append(_f(rule, True, f"workload {w.name}", f"no {flag} {want}"))
            continue
        lacking = [n for n, f in _hosts(ctx) if not getattr(f.runtime, field)]
        have = sorted({getattr(f.runtime, field) for _, f in _hosts(ctx)} - {""})
        if lacking:
            evidence = f"{flag} {want}, but {field} is not installed in the runtime on {', '.join(lacking)}"
        else:
            evidence = f"{flag} {want} with {field} {', '.join(have) or '?'} in every runtime"
        out.append(_f(rule, not lacking, f"workload {w.name}", evidence))
    return out


@evaluator("mxfp4")
def mxfp4(ctx: CheckContext, rule: Rule) -> list[Finding]:
    """`--quantization mxfp4`: fine on vLLM >= `args.online_from` (online MXFP4 for an unquantized checkpoint, the
    checkpoint's own MXFP4 otherwise); on an older or unknown vLLM it needs an MXFP4 checkpoint, which only a model
    name naming gpt-oss (all of whose checkpoints are MXFP4) shows; any other name cannot be judged from here."""
    out = []
    vllm = _vllm_version(ctx)
    online = bool(vllm) and version_tuple(vllm) >= version_tuple(str(rule.args["online_from"]))
    for w in ctx.inventory.workloads:
        q = _arg_value(w, "--quantization")
        if q is None or q.lower() != "mxfp4":
            out.append(_f(rule, True, f"workload {w.name}", f"no --quantization mxfp4 ({q or 'none'})"))
            continue
        if online:
            evidence = f"--quantization mxfp4 on vLLM {vllm}: online MXFP4 unless {w.model} is already MXFP4"
            out.append(_f(rule, True, f"workload {w.name}", evidence))
        elif "gpt-oss" in w.model.lower():
            out.append(_f(rule, True, f"workload {w.name}", f"--quantization mxfp4 with {w.model} (MXFP4 weights)"))
        else:
            where = f"vLLM {vllm}" if vllm else "an unknown vLLM"
            evidence = (
                f"--quantization mxfp4 with {w.model} on {where} (no online MXFP4 before {rule.args['online_from']}): "
                "loads only if the checkpoint is MXFP4"
            )
            out.append(_f(rule, False, f"workload {w.name}", evidence))
    return out
