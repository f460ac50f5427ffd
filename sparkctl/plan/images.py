"""Planners for the image on every Spark (container mode): the scoped access one Spark uses to copy to another, the
copy itself (`docker save | ssh | docker load`, host to host over the fabric), and its check.

The image is read where it already is: the Ray head if it has it, else the first host that does (in inventory
order); if no host has it, the Ray head pulls it first. Every host without it, or with another image under the
same name, gets the source's copy. Nothing passes through the laptop and nothing goes over the management network:
the copy addresses the target's fabric address (the one Ray and the collectives use).

Access between Spark is sparkctl's own, and scoped to this job. The laptop keeps one ed25519 key pair per cluster
(0600, like the Ray token); the private key goes to the copying host only (`peer-key`, 0600, with a known_hosts
file naming each target's fabric addresses and the host key the laptop read from that target over its verified
SSH session). The target's authorized_keys line (sshd(8), "AUTHORIZED_KEYS FILE FORMAT", OpenSSH) carries
`restrict` (no forwarding, no pty, no ~/.ssh/rc), `from="<the other hosts' fabric addresses>"` and
`command="<state>/peer-receive"`: whatever the client asks, sshd runs that script, which runs `docker load` and
nothing else (sshd puts the requested command in SSH_ORIGINAL_COMMAND).
"""

from __future__ import annotations

import hashlib
import shlex

from sparkctl import paths
from sparkctl.inventory.models import Host, Inventory
from sparkctl.plan import weights
from sparkctl.plan.context import PlanContext
from sparkctl.plan.layout import fabric_ip, ray_wanted
from sparkctl.plan.models import Command, Step, Wait
from sparkctl.plan.runtime import peer_ssh

q = shlex.quote

PEER_KEY_SECRET = "peer_key"
PEER_PUB_SECRET = "peer_key_pub"


RSYNC_RECEIVE = (
    # rsync's server side as the client's `rsync -a --partial-dir=.rsync-partial <dir>/ <host>:<folder>/` asks for
    # it over ssh (rsync(1), "USING RSYNC-DAEMON FEATURES VIA A REMOTE-SHELL CONNECTION"; main.c server_options):
    # `rsync --server -<flags>e.<capabilities> --partial-dir .rsync-partial . <folder>/`. Only that form is run:
    # the flags of -a (no -L/-K/-k, which follow links on the receiver), no other option, the destination one
    # models--* folder of the hub cache; and --safe-links, so no received symlink may point out of the copy.
    '  "rsync --server "*)\n'
    "    set -f; set -- $SSH_ORIGINAL_COMMAND; f=$3; pre=${f%%e.*}\n"
    '    case "$#|$1|$2|$4|$5|$6" in "7|rsync|--server|--partial-dir|.rsync-partial|.") ;; *) deny ;; esac\n'
    '    case "$pre" in -|-*[!logDtpr]*) deny ;; esac\n'
    '    case "${f#"$pre"}" in e.*[!A-Za-z]*) deny ;; e.?*) ;; *) deny ;; esac\n'
    '    case "$7" in models--*/) ;; *) deny ;; esac\n'
    '    case "${7%/}" in *[!A-Za-z0-9._-]*|*..*) deny ;; esac\n'
    '    mkdir -p "$hub" && cd "$hub" && exec rsync --server "$f" --partial-dir .rsync-partial --safe-links . "$7" ;;\n'
)


def render_peer_receive(cluster: str, hub: str) -> str:
    """The forced command of the peer key on a target: `docker load` of what arrives on stdin, or rsync receiving
    one model repository into this host's hub cache (RSYNC_RECEIVE); nothing else."""
    return (
        "#!/bin/sh\n"
        f"# Managed by sparkctl: what another Spark of cluster {cluster} may run here with its peer key\n"
        "# (authorized_keys command=; sshd puts the command the client asked for in SSH_ORIGINAL_COMMAND).\n"
        "deny() {\n"
        '  echo "sparkctl peer key: only docker load and rsync of a model into the hub cache are allowed here" >&2\n'
        "  exit 1\n"
        "}\n"
        f"hub={q(hub)}\n"
        'case "$SSH_ORIGINAL_COMMAND" in\n'
        '  "docker load") exec docker load ;;\n' + RSYNC_RECEIVE + "  *) deny ;;\n"
        "esac\n"
    )


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def image_source(inv: Inventory, facts: dict[str, str]) -> Host | None:
    """The host the image is read from: the Ray head if it holds the image, else the first host that does.

    `facts` maps host name -> the image ID that host holds ('' when it has none)."""
    for h in [inv.head, *(h for h in inv.hosts if h.name != inv.head.name)]:
        if facts.get(h.name):
            return h
    return None


def _image_ids(ctx: PlanContext) -> dict[str, str]:
    return {name: f.runtime.image_id for name, f in ctx.facts.items()}


def transfers(ctx: PlanContext) -> tuple[Host, list[Host], bool] | None:
    """(the source, the hosts it copies to, whether it pulls first), or None when every host has the same image."""
    inv = ctx.inventory
    if not inv.runtime.image:
        return None
    ids = _image_ids(ctx)
    source = image_source(inv, ids)
    if source is None:
        return inv.head, [h for h in inv.hosts if h.name != inv.head.name], True
    targets = [h for h in inv.hosts if ids.get(h.name) != ids[source.name]]
    return (source, targets, False) if targets else None


def peer_options(inv: Inventory, target: Host, home: str) -> str:
    """The authorized_keys options of the peer key on `target`: restricted, from the other hosts' fabric addresses,
    forced to `peer-receive`."""
    sources = ",".join(str(t.address.ip) for h in inv.hosts if h.name != target.name for t in h.fabric)
    return f'restrict,from="{sources}",command="{paths.peer_file(home, "peer-receive")}"'


def render_peer_known_hosts(ctx: PlanContext, targets: list[Host]) -> str:
    """known_hosts of the copying host: each target's fabric addresses with the host key the laptop read from it."""
    lines = []
    for h in targets:
        key = ctx.facts[h.name].ssh_host_key or "(host key not readable)"
        lines.append(f"{','.join(str(t.address.ip) for t in h.fabric)} {key}\n")
    return "".join(lines)


def _state_file(
    host: Host, kind: str, path: str, mode: str, have: str | None, want: str, description: str, **stdin: str
) -> list[Step]:
    """Install one file of the state dir (content on stdin: `stdin=` text or `stdin_secret=` a secret's name) unless
    the probe's sha256 of it (`have`) is already `want`; plain text content is shown in the diff, line by line."""
    if have == want:
        return []
    return [
        Step(
            host=host.name,
            kind=kind,
            target=path,
            description=description,
            commands=[Command(argv=["install", "-D", "-m", mode, "/dev/stdin", path], **stdin)],
            diff=[f"- {path}: {'another version' if have else 'absent'}"]
            + ([f"+ {line}" for line in stdin["stdin"].splitlines()] if "stdin" in stdin else [f"+ {path}"]),
        )
    ]


def copy_routes(ctx: PlanContext) -> dict[str, list[Host]]:
    """Every host that copies to another this run (the image, model weights) -> the hosts it copies to."""
    out: dict[str, list[Host]] = {}
    found = transfers(ctx)
    pairs = [(found[0], t) for t in found[1]] if found is not None else []
    for source, target in pairs + weights.copy_pairs(ctx):
        if target not in out.setdefault(source.name, []):
            out[source.name].append(target)
    return out


def plan_peer_access(ctx: PlanContext, host: Host) -> list[Step]:
    """Only when a copy is due (the image, model weights): the peer key and known_hosts on each copying host, the
    restricted authorized_keys line and its forced command on each target."""
    copies = copy_routes(ctx)
    if not copies:
        return []
    inv = ctx.inventory
    facts = ctx.facts[host.name]
    home = ctx.home(host)
    steps = []
    if host.name in copies:
        targets = copies[host.name]
        known = render_peer_known_hosts(ctx, targets)
        copies_to = ", ".join(t.name for t in targets)
        # no key on the laptop yet (a plan before the first copy): the run that applies this step makes one
        steps += _state_file(
            host,
            "peer_key",
            paths.peer_file(home, "peer-key"),
            "0600",
            facts.files.get("peer-key.sha256"),
            ctx.digests.get(PEER_KEY_SECRET, "(made by the run)"),
            f"install the cluster's peer key (0600): this host copies to {copies_to}",
            stdin_secret=PEER_KEY_SECRET,
        )
        steps += _state_file(
            host,
            "peer_key",
            paths.peer_file(home, "peer-known-hosts"),
            "0644",
            facts.files.get("peer-known-hosts.sha256"),
            sha256(known),
            "record the targets' host keys for their fabric addresses",
            stdin=known,
        )
    sources = [name for name, targets in copies.items() if host in targets]
    if sources:
        script = render_peer_receive(inv.cluster, weights.hub_dir(inv, home))
        steps += _state_file(
            host,
            "peer_access",
            paths.peer_file(home, "peer-receive"),
            "0755",
            facts.files.get("peer-receive.sha256"),
            sha256(script),
            "install the peer key's forced command (docker load, or rsync into the hub cache)",
            stdin=script,
        )
        options = peer_options(inv, host, home)
        want = f"{options} {ctx.digests.get(PEER_PUB_SECRET, '')}"
        if facts.peer_authorized != want:
            steps.append(
                Step(
                    host=host.name,
                    kind="peer_access",
                    target="~/.ssh/authorized_keys",
                    description=f"let {', '.join(sources)} copy here over the fabric (key restricted: {options})",
                    commands=[
                        Command(argv=["sh", "-c", build_authorize(inv.cluster, options)], stdin_secret=PEER_PUB_SECRET)
                    ],
                    diff=[f"- {facts.peer_authorized or '(no peer key)'}", f"+ {options} <peer key of {inv.cluster}>"],
                )
            )
    return steps


def build_authorize(cluster: str, options: str) -> str:
    """Replace the cluster's peer-key line of ~/.ssh/authorized_keys (public key on stdin), keeping every other line;
    the file is written beside and renamed over, 0600 in a 0700 ~/.ssh as sshd's StrictModes wants."""
    comment = paths.peer_comment(cluster)
    ak = '"$HOME/.ssh/authorized_keys"'
    return (
        'IFS= read -r key && mkdir -p "$HOME/.ssh" && chmod 700 "$HOME/.ssh" && touch ' + ak + " && "
        f"{{ grep -vF {q(' ' + comment)} {ak} || true; printf '%s %s\\n' {q(options)} \"$key\"; }} "
        f'> "$HOME/.ssh/authorized_keys.sparkctl" && chmod 600 "$HOME/.ssh/authorized_keys.sparkctl" && '
        f'mv "$HOME/.ssh/authorized_keys.sparkctl" {ak}'
    )


def build_image_copy(inv: Inventory, source_home: str, target: Host, user: str) -> str:
    """Stream the image from this host to `target`'s fabric address: `docker save` into the peer key's ssh, whose
    forced command on the target runs `docker load`. `docker save` writes the image as a tar stream to stdout,
    `docker load` reads one from stdin (Docker CLI reference)."""
    ssh = [*peer_ssh(source_home), f"{user}@{fabric_ip(target)}", "docker load"]
    return f"docker save {q(inv.runtime.image or '')} | {shlex.join(ssh)}"


def _gb(size: int, what: str = "") -> str:
    return f"{size / 1e9:.1f} GB{what}" if size else "size known after the pull"


def plan_image_copy(ctx: PlanContext, host: Host) -> list[Step]:
    """On the source host: pull the image when no host has it, then copy it to every host that lacks it."""
    found = transfers(ctx)
    if found is None or host.name != found[0].name:
        return []
    source, targets, pull = found
    inv = ctx.inventory
    image = inv.runtime.image or ""
    rt = ctx.facts[host.name].runtime
    steps = []
    if pull:
        steps.append(
            Step(
                host=host.name,
                kind="image_pull",
                target=image,
                description=f"pull {image}: no host has it",
                commands=[Command(argv=["docker", "pull", image])],
                diff=[f"- {host.name}: {image} absent", f"+ {host.name}: {image}"],
            )
        )
    for t in targets:
        have = ctx.facts[t.name].runtime.image_id
        steps.append(
            Step(
                host=host.name,
                kind="image_copy",
                target=t.name,
                description=f"copy {image} to {t.name} over the fabric "
                f"({fabric_ip(source)} -> {fabric_ip(t)}, {_gb(rt.image_size)})",
                commands=[Command(argv=["sh", "-c", build_image_copy(inv, ctx.home(host), t, ctx.facts[t.name].user)])],
                diff=[
                    f"- {t.name}: {'image ' + have[:19] if have else 'no image'}",
                    f"+ {t.name}: image {rt.image_id[:19] or image} ({_gb(rt.image_size, ' to move')})",
                ],
                depends_on_earlier=pull,
            )
        )
    return steps


def plan_image_check(ctx: PlanContext, host: Host) -> list[Step]:
    """On a host the image is copied to: the image under its name has the source's ID."""
    found = transfers(ctx)
    if found is None or host not in found[1]:
        return []
    source = found[0]
    want = ctx.facts[source.name].runtime.image_id
    if not want:  # pulled in this run: the re-plan after the pull knows the ID
        return []
    image = ctx.inventory.runtime.image or ""
    line = f"test \"$(docker image inspect --format '{{{{.Id}}}}' {q(image)})\" = {q(want)}"
    return [
        Step(
            host=host.name,
            kind="verify_image",
            target=image,
            description=f"{image} on {host.name} is {source.name}'s ({want[:19]})",
            commands=[Command(argv=["sh", "-c", line])],
            changes=False,
            wait=Wait(kind="remote", deadline=10, interval=1),
        )
    ]


RAY_WHEELS_IN_BUILD = "/tmp/sparkctl-ray-wheels"


def render_ray_containerfile(inv: Inventory) -> str:
    """The Dockerfile of the image derived with Ray: FROM the user's image, `pip install 'ray[default]==<v>'` with the
    image's own Python, as NVIDIA's vLLM playbook adds Ray to nvcr.io/nvidia/vllm:26.05-py3 before `ray start`
    (dgx-spark-playbooks nvidia/vllm/README.md; vLLM's examples/ray_serving/run_cluster.sh patched with
    `pip install ray`); from `ray_wheels` (copied in as the build context) when the hosts reach no package index."""
    rt = inv.runtime
    want = f"ray[default]=={rt.add_ray}"
    if rt.ray_wheels:
        return (
            f"FROM {rt.image}\n"
            f"COPY . {RAY_WHEELS_IN_BUILD}\n"
            f"RUN python3 -m pip install --no-cache-dir --no-index --find-links {RAY_WHEELS_IN_BUILD} {q(want)} "
            f"&& rm -rf {RAY_WHEELS_IN_BUILD}\n"
        )
    return f"FROM {rt.image}\nRUN python3 -m pip install --no-cache-dir {q(want)}\n"


def build_ray_image(inv: Inventory, base_id: str) -> str:
    """`docker build` of the derived image, the Dockerfile on stdin (`-f -`, Docker's and podman's build), the wheel
    directory (or an empty directory) as the context, labelled with the ID of the image it is built from."""
    tag = q(inv.runtime.ray_image)
    label = q(f"sparkctl.base={base_id}")
    if inv.runtime.ray_wheels:
        return f"docker build -q -t {tag} --label {label} -f - {q(inv.runtime.ray_wheels)}"
    return f'ctx=$(mktemp -d) && docker build -q -t {tag} --label {label} -f - "$ctx"; rc=$?; rmdir "$ctx"; exit $rc'


def plan_ray_image(ctx: PlanContext, host: Host) -> list[Step]:
    """runtime.add_ray, when a workload needs Ray: the derived image on this host, built from the image this host
    holds (after the copy, the source's) unless already built from that very image."""
    inv = ctx.inventory
    if not inv.runtime.add_ray or not ray_wanted(inv):
        return []
    rt = ctx.facts[host.name].runtime
    found = transfers(ctx)
    base = rt.image_id
    if found is not None and host in found[1]:  # the copy brings the source's image here first
        base = ctx.facts[found[0].name].runtime.image_id
    if rt.ray_image_id and rt.ray_image_base == base and base:
        return []
    containerfile = render_ray_containerfile(inv)
    source = f"from {inv.runtime.ray_wheels} (no index)" if inv.runtime.ray_wheels else "from the package index"
    return [
        Step(
            host=host.name,
            kind="ray_image",
            target=inv.runtime.ray_image,
            description=f"build {inv.runtime.ray_image}: {inv.runtime.image} with Ray {inv.runtime.add_ray} added "
            f"{source}",
            commands=[Command(argv=["sh", "-c", build_ray_image(inv, base)], stdin=containerfile)],
            diff=[f"- {inv.runtime.ray_image}: {'built from another image' if rt.ray_image_id else 'absent'}"]
            + [f"+ {line}" for line in containerfile.splitlines()],
            depends_on_earlier=found is not None,
        )
    ]
