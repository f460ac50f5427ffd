"""Rules on the runtime and Ray: ports, Ray's exposure, the runtime's versions and contents, the image's CUDA."""

from __future__ import annotations

from sparkctl.doctor.evaluators.core import CheckContext, _f, _hosts, _probed, evaluator
from sparkctl.doctor.rules import Finding, Rule
from sparkctl.facts.models import HostFacts
from sparkctl.inventory.models import Inventory
from sparkctl.plan.env import version_tuple
from sparkctl.plan.images import image_source
from sparkctl.plan.layout import needs_ray, ray_wanted
from sparkctl.plan.live_state import RAY_MARKERS


def _needed_ports(inv: Inventory, host: str) -> dict[int, str]:
    ports = {p: "ray" for p in inv.ray.ports.model_dump().values()}
    ports.pop(inv.ray.ports.min_worker, None)
    ports.pop(inv.ray.ports.max_worker, None)
    if host == inv.head.name:
        ports[inv.ray.port] = "ray"
    for w in inv.workloads:  # the API listens on the workload's head (the first host of its group)
        if inv.workload_head(w).name == host:
            ports[w.port] = f"workload {w.name}"
    return ports


def _ours(owner: str, ray_running: bool, f: HostFacts) -> bool:
    """A busy port belongs to this cluster: Ray's while Ray runs, a workload's while sparkctl records it."""
    if owner == "ray":
        return ray_running
    return f"workload-{owner.removeprefix('workload ')}.pid" in f.files


@evaluator("ports_free")
def ports_free(ctx: CheckContext, rule: Rule) -> list[Finding]:
    out = []
    for name, f in _hosts(ctx):
        ray_running = any(m in p.args for p in f.processes for m in RAY_MARKERS[:2]) or "sparkctl-ray" in f.containers
        needed = _needed_ports(ctx.inventory, name)
        busy = sorted({ln.port for ln in f.listeners if ln.port in needed})

        foreign = [p for p in busy if not _ours(needed[p], ray_running, f)]
        if foreign:
            evidence = "held by something else: " + ", ".join(f"{p} ({needed[p]})" for p in foreign)
        else:
            evidence = f"ports in use by this cluster: {', '.join(map(str, busy))}" if busy else "needed ports free"
        out.append(_f(rule, not foreign, name, evidence))
    return out


@evaluator("ray_exposure")
def ray_exposure(ctx: CheckContext, rule: Rule) -> list[Finding]:
    out = []
    for h, f in _probed(ctx):
        ray_ports = set(_needed_ports(ctx.inventory, h.name)) - {w.port for w in ctx.inventory.workloads}
        fabric = {str(t.address.ip) for t in h.fabric}
        exposed = sorted(
            {
                f"{ln.address}:{ln.port}"
                for ln in f.listeners
                if ln.port in ray_ports and ln.address not in fabric | {"127.0.0.1", "::1"}
            }
        )
        if not any("raylet" in p.args for p in f.processes):
            continue
        guarded = "table inet sparkctl" in f.files.get("firewall.nft", "")
        if exposed and guarded:
            evidence = (
                f"Ray listens on {len(exposed)} wildcard socket(s); the sparkctl firewall admits them only "
                "on the fabric and loopback"
            )
        elif exposed:
            evidence = f"Ray listening beyond the fabric, no sparkctl firewall: {', '.join(exposed)}"
        else:
            evidence = "Ray listens on the fabric address and loopback only"
        out.append(_f(rule, not exposed or guarded, h.name, evidence))
    return out


def _image_source(ctx: CheckContext) -> str | None:
    """Container mode: the host whose image `up` copies to the others (plan/images.py), None if none has it."""
    host = image_source(ctx.inventory, {n: f.runtime.image_id for n, f in _hosts(ctx)})
    return host.name if host else None


@evaluator("runtime_versions")
def runtime_versions(ctx: CheckContext, rule: Rule) -> list[Finding]:
    hosts = _hosts(ctx)
    if ctx.inventory.runtime.image:  # `up` copies the source's image to every other host: only it is judged
        source = _image_source(ctx)
        ids = {n: f.runtime.image_id for n, f in hosts}
        others = [n for n, _ in hosts if source is not None and ids[n] != ids[source]]
        hosts = [(n, f) for n, f in hosts if n == source]
        if others and source is not None:
            lacking = ", ".join(f"{n} ({'image ' + ids[n][:19] if ids[n] else 'no image'})" for n in others)
            evidence = f"{source}: image {ids[source][:19]}; {lacking}: up copies {source}'s image there"
            return [_f(rule, False, "cluster", evidence, level="warn")]
    seen = {name: (f.runtime.python, f.runtime.ray, f.runtime.vllm, f.runtime.image_id) for name, f in hosts}
    if not seen:
        return []
    distinct = set(seen.values())
    text = "; ".join(
        f"{n}: python {v[0] or '?'} ray {v[1] or '?'}"
        + (f" vllm {v[2]}" if v[2] else "")
        + (f" image {v[3][:19]}" if v[3] else "")
        for n, v in seen.items()
    )
    missing = [n for n, v in seen.items() if not v[1] and not v[3]]
    if missing:
        return [_f(rule, False, "cluster", f"no runtime found on {', '.join(missing)} ({text})")]
    return [_f(rule, len(distinct) == 1, "cluster", text)]


def _ray_users(inv: Inventory) -> str:
    """Who needs Ray: the workloads that use it, named, else sparkctl's Ray cluster itself (`ray_wanted`)."""
    users = [w.name for w in inv.workloads if needs_ray(w)]
    return f"workload {', '.join(users)}" if users else "sparkctl's Ray cluster"


@evaluator("runtime_support")
def runtime_support(ctx: CheckContext, rule: Rule) -> list[Finding]:
    """Each host's runtime holds what sparkctl relies on: Ray >= the minimum (token auth), vLLM for vLLM workloads."""
    inv = ctx.inventory
    where = f"venv {inv.runtime.venv}" if inv.runtime.venv else f"image {inv.runtime.image}"
    minimum = str(rule.args["ray_minimum"])
    needs_vllm = any(w.engine == "vllm" for w in inv.workloads)
    out = []
    source = _image_source(ctx) if inv.runtime.image else None
    for name, f in _hosts(ctx):
        rt = f.runtime
        here = where
        problems, fixes = [], []
        image_missing = bool(inv.runtime.image) and not rt.image_id
        if image_missing and source is None:
            out.append(
                _f(
                    rule,
                    True,
                    name,
                    f"image {inv.runtime.image} is on no host yet: up pulls it on "
                    f"{inv.head.name}, then copies it (judged once it is there)",
                )
            )
            continue
        if inv.runtime.image and source is not None and rt.image_id != ctx.facts[source].runtime.image_id:
            # up copies the source's image here before anything runs: what counts is what that image holds
            rt = ctx.facts[source].runtime
            here = f"image {inv.runtime.image} (as {source} holds it: up copies it here)"
        if not rt.python:
            problems.append(f"no Python found in the {here}")
            fixes.append(f"create the runtime on {name} ({rule.args['install']})")
        elif not rt.ray and ray_wanted(inv) and inv.runtime.add_ray:
            here += f" (Ray {inv.runtime.add_ray} added by sparkctl: {inv.runtime.ray_image})"
            if version_tuple(inv.runtime.add_ray) < version_tuple(minimum):
                problems.append(f"runtime.add_ray {inv.runtime.add_ray} is older than {minimum} (no token auth)")
                fixes.append(f"set runtime.add_ray to a Ray version >= {minimum}")
        elif not rt.ray and ray_wanted(inv):
            problems.append(f"no Ray in the {here}, which {_ray_users(inv)} needs")
            fixes.append(
                f"install Ray >= {minimum} into the runtime on {name} ({rule.args['install']})"
                if inv.runtime.venv
                else f"set runtime.add_ray: <Ray version>, e.g. {minimum}.0 or newer (sparkctl builds an image FROM "
                f"{inv.runtime.image} with Ray added, on each host), or use an image that ships Ray >= {minimum} "
                f"on {name}"
            )
        elif rt.ray and ray_wanted(inv) and version_tuple(rt.ray) < version_tuple(minimum):
            problems.append(f"Ray {rt.ray} in the {here} is older than {minimum} (no token authentication)")
            fixes.append(f"upgrade Ray on {name} to >= {minimum} ({rule.args['install']})")
        if needs_vllm and rt.python and not rt.vllm:
            problems.append(f"no vLLM in the {here}, but the inventory has a vllm workload")
            fixes.append(f"install vLLM into the runtime on {name}, or use an NGC vLLM image")
        found = f"Python {rt.python or '?'}, Ray {rt.ray or 'absent'}, vLLM {rt.vllm or 'absent'}"
        if not ray_wanted(inv):
            found += " (Ray not needed: no workload uses it)"
        evidence = "; ".join(problems) + f" (found: {found})" if problems else f"{here}: {found}"
        out.append(_f(rule, not problems, name, evidence, fix="; ".join(fixes) or None))
    return out


@evaluator("image_driver")
def image_driver(ctx: CheckContext, rule: Rule) -> list[Finding]:
    """Container mode: each host's driver supports the CUDA the image requires (its NVIDIA_REQUIRE_CUDA, else its
    CUDA_VERSION: facts.parse.image_cuda_requirement), the image judged being the one `up` runs there (the source's,
    copied). The NVIDIA Container Toolkit refuses such a container anyway ("unsatisfied condition: cuda>=..."), after
    sparkctl had changed the hosts; this says it before."""
    inv = ctx.inventory
    if not inv.runtime.image:
        return [_f(rule, True, name, f"venv {inv.runtime.venv}: no image") for name, _ in _hosts(ctx)]
    source = _image_source(ctx)
    if source is None:
        return [_f(rule, True, name, "not judged: the image is on no host yet") for name, _ in _hosts(ctx)]
    need = ctx.facts[source].runtime.image_cuda
    out = []
    for name, f in _hosts(ctx):
        driver = f.gpus[0].driver if f.gpus else "?"
        if not need or not f.cuda_version:
            what = "the image states no CUDA requirement" if not need else "the driver's CUDA version is unknown"
            out.append(_f(rule, True, name, f"not judged: {what}"))
            continue
        ok = version_tuple(f.cuda_version) >= version_tuple(need)
        evidence = f"image {inv.runtime.image} requires CUDA >= {need}; driver {driver} supports CUDA {f.cuda_version}"
        out.append(_f(rule, ok, name, evidence))
    return out
