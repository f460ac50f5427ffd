"""Planners for the model weights on every Spark of a vllm workload's group: fetched once, copied over the fabric,
verified.

For each workload naming a Hugging Face id (`Inventory.synced_weights`): the source is the first host of the group
(its head first) holding a verified copy of `<repo>@<revision>`; if none does, the group's head downloads it with
the runtime's own `huggingface_hub` (sparkctl/workers/weights.py `fetch`: hub file list, space check on every
host, `snapshot_download`, sha256 of each LFS file against the hub's). Every other host of the group whose copy is
not the source's gets it host to host over the fabric with rsync, through the cluster's peer key (plan/images.py:
the same scoped access as the image copy; the target's forced command runs only rsync's receiving side, into one
models--* folder of its hub cache, with --safe-links), then checks it against the source's manifest (`verify`:
names, sizes, LFS sha256).

A host's copy counts as verified when sparkctl's manifest for it is there and the probe's listing still shows every
file of it with its size: a converged cluster costs one listing per host and moves nothing.

rsync (rsync(1), 3.2): `-a` keeps the cache's relative symlinks (snapshots/<commit>/<file> -> ../../blobs/<id>);
`--partial-dir` keeps an interrupted file aside (never under its final name) and the next run continues from it;
`--no-inc-recursive` lets `--info=progress2` show the whole transfer's percentage.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from typing import Any

from sparkctl import paths
from sparkctl.facts.models import WeightsCopy
from sparkctl.inventory.models import Host, Inventory, Workload
from sparkctl.plan.context import PlanContext
from sparkctl.plan.layout import fabric_ip
from sparkctl.plan.models import Command, Step
from sparkctl.plan.runtime import peer_ssh

q = shlex.quote

CODE_BLOB = "weights_code"
"""The helper's source (sparkctl/workers/weights.py), fed on stdin when installed."""
MARGIN = 1 << 30
"""Bytes kept free on a disk after the weights land (as the helper keeps)."""
PARTIAL_DIR = ".rsync-partial"
CONTAINER_HF = "/root/.cache/huggingface"
"""Where the hub cache is mounted in a container (as the workloads' containers mount it: plan/runtime.py)."""


def key(w: Workload) -> str:
    """`<repo>@<revision>`: what a host holds, as the probe names it."""
    return f"{w.model}@{w.revision or 'main'}"


def token_secret(w: Workload) -> str:
    return f"hf_token:{w.name}"


@dataclass(frozen=True)
class Route:
    """One model repository for one group: where it is read from, whether it must be fetched first, where it goes."""

    workload: Workload
    source: Host
    fetch: bool
    targets: list[Host]
    manifest: dict[str, Any] | None
    """The source's verified manifest (None until fetched)."""


def manifest_of(copy: WeightsCopy | None) -> dict[str, Any] | None:
    """The manifest sparkctl wrote on a host, if it reads as one."""
    if copy is None or not copy.manifest:
        return None
    try:
        data = json.loads(copy.manifest)
    except json.JSONDecodeError:
        return None
    ok = isinstance(data, dict) and isinstance(data.get("files"), list) and isinstance(data.get("commit"), str)
    return data if ok else None


def _blobs(copy: WeightsCopy, manifest: dict[str, Any]) -> dict[str, int | None]:
    """Each blob the manifest's files need -> its size if this copy holds it whole, else None."""
    out: dict[str, int | None] = {}
    snap = f"snapshots/{manifest['commit']}/"
    for f in manifest["files"]:
        blob = f.get("blob", "")
        link = copy.links.get(snap + f["path"], "")
        held = copy.files.get(f"blobs/{blob}")
        ok = link.endswith(f"/blobs/{blob}") and held == f["size"]
        plain = copy.files.get(snap + f["path"]) == f["size"]  # a snapshot without symlinks (no blob)
        out[blob or snap + f["path"]] = f["size"] if ok or plain else None
    return out


def holds(copy: WeightsCopy | None, manifest: dict[str, Any]) -> bool:
    """Does this copy show every file of the manifest, with its size, where the snapshot points?"""
    return copy is not None and None not in _blobs(copy, manifest).values()


def bytes_missing(copy: WeightsCopy | None, manifest: dict[str, Any]) -> int:
    """Bytes of the manifest's files this copy lacks (each blob once)."""
    sizes = {f.get("blob") or f["path"]: int(f["size"]) for f in manifest["files"]}
    if copy is None:
        return sum(sizes.values())
    have = _blobs(copy, manifest)
    return sum(size for blob, size in sizes.items() if have.get(blob) is None)


def bytes_held(copy: WeightsCopy | None) -> int:
    """Bytes of finished blobs a host already holds for the repository (what a fetch or copy need not move)."""
    if copy is None:
        return 0
    return sum(n for p, n in copy.files.items() if p.startswith("blobs/") and not p.endswith(".incomplete"))


def verified(copy: WeightsCopy | None) -> dict[str, Any] | None:
    """The host's own manifest, when its listing still holds every file of it."""
    manifest = manifest_of(copy)
    return manifest if manifest is not None and holds(copy, manifest) else None


def routes(ctx: PlanContext) -> list[Route]:
    """Per synced repository and group: the source, whether it fetches, the hosts it copies to."""
    inv = ctx.inventory
    out = []
    seen: set[tuple[str, tuple[str, ...]]] = set()
    for w in inv.synced_weights():
        group = inv.group(w)
        ident = (key(w), tuple(h.name for h in group))
        if ident in seen:
            continue
        seen.add(ident)
        copies = {h.name: ctx.facts[h.name].weights.get(key(w)) for h in group}
        have = {h.name: verified(copies[h.name]) for h in group}
        source = next((h for h in group if have[h.name] is not None), None)
        if source is None:
            out.append(Route(w, group[0], True, group[1:], None))
            continue
        manifest = have[source.name]
        assert manifest is not None
        targets = [
            h
            for h in group
            if h.name != source.name
            and ((have[h.name] or {}).get("commit") != manifest["commit"] or not holds(copies[h.name], manifest))
        ]
        if targets:
            out.append(Route(w, source, False, targets, manifest))
    return out


def copy_pairs(ctx: PlanContext) -> list[tuple[Host, Host]]:
    """(source, target) of every weights copy due: the peer access each needs (plan/images.py)."""
    return [(r.source, t) for r in routes(ctx) for t in r.targets]


def repo_dir(inv: Inventory, home: str, w: Workload) -> str:
    return f"{hub_dir(inv, home)}/{paths.hub_folder(w.model)}"


def hub_dir(inv: Inventory, home: str) -> str:
    """The host's hub cache, absolute."""
    return f"{inv.runtime.hf_cache.replace('~', home, 1).rstrip('/')}/hub"


def _script(home: str) -> str:
    return f"{paths.state_dir(home)}/{paths.WEIGHTS_SCRIPT}"


def _manifest_path(home: str, w: Workload) -> str:
    return f"{paths.state_dir(home)}/{paths.weights_manifest(w.model, w.revision or 'main')}"


def hub_env(w: Workload) -> dict[str, str]:
    """The workload's Hugging Face settings (HF_ENDPOINT, HF_HUB_OFFLINE, ...): the fetch runs with them."""
    return {k: v for k, v in w.env.items() if k.startswith("HF_")}


def build_fetch(inv: Inventory, home: str, w: Workload, peers: list[str]) -> str:
    """The helper's `fetch` under the runtime's Python (the venv's, or the image's in a throwaway container with
    the host's cache and state dir mounted as the workload containers mount them), the token on stdin."""
    revision = w.revision or "main"
    env = hub_env(w)
    state = paths.state_dir(home)
    if inv.runtime.venv:
        exports = "".join(f"export {k}={q(v)}; " for k, v in sorted(env.items()))
        argv = [f"{inv.runtime.venv}/bin/python", _script(home), "fetch", w.model, revision, hub_dir(inv, home)]
        return f"{exports}exec {shlex.join([*argv, _manifest_path(home, w), *peers])}"
    hf = inv.runtime.hf_cache.replace("~", home, 1)
    docker = ["docker", "run", "--rm", "-i", "--network", "host", "-v", f"{hf}:{CONTAINER_HF}"]
    docker += ["-v", f"{state}:{paths.CONTAINER_STATE}"]
    for k, v in sorted(env.items()):
        docker += ["-e", f"{k}={v}"]
    in_state = f"{paths.CONTAINER_STATE}/{paths.weights_manifest(w.model, revision)}"
    docker += ["--entrypoint", "python3", inv.runtime.image or "", f"{paths.CONTAINER_STATE}/{paths.WEIGHTS_SCRIPT}"]
    docker += ["fetch", w.model, revision, f"{CONTAINER_HF}/hub", in_state, *peers]
    return f"mkdir -p {q(hf)} {q(state)}/weights && exec {shlex.join(docker)}"


def build_copy(inv: Inventory, home: str, w: Workload, target: Host, user: str) -> str:
    """rsync of the repository folder to `target`'s fabric address, through the peer key; the target's forced
    command confines it to its hub cache (plan/images.py, render_peer_receive)."""
    folder = paths.hub_folder(w.model)
    ssh = shlex.join(peer_ssh(home))
    argv = ["rsync", "-a", f"--partial-dir={PARTIAL_DIR}", "--no-inc-recursive", "--info=progress2"]
    argv += ["-e", ssh, f"{repo_dir(inv, home, w)}/", f"{user}@{fabric_ip(target)}:{folder}/"]
    return shlex.join(argv)


def build_verify(inv: Inventory, home: str, w: Workload) -> str:
    """The helper's `verify` under the host's python3 (standard library only), the source's manifest on stdin."""
    return shlex.join(["python3", _script(home), "verify", repo_dir(inv, home, w), _manifest_path(home, w)])


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def _size(manifest: dict[str, Any]) -> int:
    return sum(int(f["size"]) for f in manifest["files"])


def _install(ctx: PlanContext, host: Host) -> list[Step]:
    have = ctx.facts[host.name].files.get(f"{paths.WEIGHTS_SCRIPT}.sha256")
    want = ctx.digests.get(CODE_BLOB, "")
    if have == want:
        return []
    target = _script(ctx.home(host))
    return [
        Step(
            host=host.name,
            kind="weights_code",
            target=target,
            description="install sparkctl's weights helper (fetch and verify)",
            commands=[Command(argv=["install", "-D", "-m", "0644", "/dev/stdin", target], stdin_blob=CODE_BLOB)],
            diff=[f"- {target}: {'another version' if have else 'absent'}", f"+ {target}: sha256 {want[:12]}"],
        )
    ]


def plan_weights_fetch(ctx: PlanContext, host: Host) -> list[Step]:
    """The helper on every host that fetches or verifies; on a group's head without a verified copy anywhere in the
    group, the download (refused, before any byte moves, when this host or a target lacks the space)."""
    mine = [r for r in routes(ctx) if (host.name == r.source.name and r.fetch) or host in r.targets]
    if not mine:
        return []
    steps = _install(ctx, host)
    inv = ctx.inventory
    for r in mine:
        if not (r.fetch and host.name == r.source.name):
            continue
        w = r.workload
        peers = []
        for t in r.targets:
            free = ctx.facts[t.name].hf_free
            if free >= 0:
                peers.append(f"{t.name}={free >> 30}={bytes_held(ctx.facts[t.name].weights.get(key(w)))}")
        offline = hub_env(w).get("HF_HUB_OFFLINE", "").lower() in ("1", "on", "true", "yes")
        to = ", then copied to " + ", ".join(t.name for t in r.targets) if r.targets else ""
        hub = hub_env(w).get("HF_ENDPOINT", "the hub")
        where = "from the cache only (HF_HUB_OFFLINE)" if offline else f"from {hub}"
        steps.append(
            Step(
                host=host.name,
                kind="weights_fetch",
                target=w.model,
                description=f"download {key(w)} once, here, with the runtime's huggingface_hub {where}, checking "
                f"the space on every host first{to}",
                commands=[
                    Command(
                        argv=["sh", "-c", build_fetch(inv, ctx.home(host), w, peers)],
                        stdin_secret=token_secret(w) if w.hf_token_env else None,
                        stdin=None if w.hf_token_env else "\n",
                        timeout=86400,
                        progress="bytes",
                    )
                ],
                diff=[
                    f"- {host.name}: {key(w)} not verified here",
                    f"+ {host.name}: {key(w)} (size known from the hub)",
                ],
            )
        )
    return steps


def plan_weights_copy(ctx: PlanContext, host: Host) -> list[Step]:
    """On a source: rsync to every target of its group over the fabric (refused when a target lacks the space)."""
    inv = ctx.inventory
    steps = []
    for r in routes(ctx):
        if host.name != r.source.name:
            continue
        w = r.workload
        for t in r.targets:
            tf = ctx.facts[t.name]
            verdict = ""
            if r.manifest is None:
                move = "size known after the download"
            else:
                need = bytes_missing(tf.weights.get(key(w)), r.manifest)
                move = f"{_gb(need)} to move of {_gb(_size(r.manifest))}"
                if tf.hf_free >= 0 and need + MARGIN > tf.hf_free:
                    verdict = (
                        f"refused: {t.name} has {_gb(tf.hf_free)} free in {hub_dir(inv, ctx.home(t))}; {key(w)} needs "
                        f"{_gb(need)} more (+1 GiB kept free)"
                    )
            if not ctx.offline and not verdict:
                if "rsync" not in ctx.facts[host.name].tools:
                    verdict = f"{host.name} has no rsync (install it: apt install rsync)"
                elif "rsync" not in tf.tools:
                    verdict = f"{t.name} has no rsync to receive the copy (install it: apt install rsync)"
            steps.append(
                Step(
                    host=host.name,
                    kind="weights_copy",
                    target=f"{t.name}:{w.model}",
                    description=f"copy {key(w)} to {t.name} over the fabric "
                    f"({fabric_ip(host)} -> {fabric_ip(t)}, {move}), resuming any earlier copy",
                    commands=[
                        Command(
                            argv=["sh", "-c", build_copy(inv, ctx.home(host), w, t, tf.user or "user")],
                            timeout=86400,
                            progress="rsync",
                        )
                    ],
                    diff=[
                        f"- {t.name}: {key(w)} {'partly held' if bytes_held(tf.weights.get(key(w))) else 'absent'}",
                        f"+ {t.name}: {key(w)} ({move})",
                    ],
                    depends_on_earlier=r.manifest is None,
                    verdict=verdict,
                )
            )
    return steps


def plan_weights_verify(ctx: PlanContext, host: Host) -> list[Step]:
    """On a target: its copy against the source's manifest (names, sizes, LFS sha256); then its own record."""
    inv = ctx.inventory
    steps = []
    for r in routes(ctx):
        if host not in r.targets:
            continue
        w = r.workload
        manifest = r.manifest or {}
        what = (
            f"{len(manifest['files'])} files, {_gb(_size(manifest))}, "
            f"{sum(1 for f in manifest['files'] if f.get('sha256'))} with the hub's sha256"
            if r.manifest
            else "the source's file list, read after the download"
        )
        steps.append(
            Step(
                host=host.name,
                kind="weights_verify",
                target=w.model,
                description=f"check {key(w)} here against {r.source.name}'s ({what}); record it",
                commands=[
                    Command(
                        argv=["sh", "-c", build_verify(inv, ctx.home(host), w)],
                        stdin=json.dumps(manifest, sort_keys=True),
                        timeout=86400,
                        progress="bytes",
                    )
                ],
                diff=[f"- {host.name}: {key(w)} not verified", f"+ {host.name}: {key(w)} verified ({what})"],
                depends_on_earlier=r.manifest is None,
            )
        )
    return steps
