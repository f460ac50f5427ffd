"""Command line: python -m tests.testbed up|down|exec|status|inventory|reset."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from ._proc import TestbedError
from .layout import parse_gid_option
from .testbed import Testbed


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tests.testbed",
        description="Fake DGX Sparks in Linux namespaces for sparkctl's integration tests.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="create the hosts and print the inventory path")
    up.add_argument("--hosts", type=int, default=2, help="number of hosts (default 2)")
    up.add_argument(
        "--topology",
        choices=["direct", "switch", "ring"],
        default=None,
        help="direct (2 hosts; the default for 2), switch (the default for more), ring (3 hosts, 4 interfaces each)",
    )
    up.add_argument(
        "--gid-index",
        action="append",
        default=[],
        metavar="HOST=INDEX",
        help="RoCE v2 IPv4 GID index of a host, e.g. spark-b=5 (default 3)",
    )
    sub.add_parser("down", help="remove everything the testbed created (idempotent)")
    ex = sub.add_parser("exec", help="run a command inside a host: exec spark-a -- ip -br addr")
    ex.add_argument("--user", default=None, help="run as this user instead of root")
    ex.add_argument("host")
    ex.add_argument("argv", nargs=argparse.REMAINDER)
    sub.add_parser("status", help="print the state file")
    sub.add_parser("inventory", help="rewrite the inventory and print its path")
    reset = sub.add_parser("reset", help="return hosts to a fresh install")
    reset.add_argument("hosts", nargs="*")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    tb = Testbed()
    try:
        if args.command == "up":
            tb.up(hosts=args.hosts, gid_index=parse_gid_option(args.gid_index), topology=args.topology)
            print(tb.inventory_path())
            asking = [h for h in tb.hosts if tb.sudo_password_for(h)]
            print(f"up in {tb.timings['total']:.1f}s", file=sys.stderr)
            if asking:
                print(
                    f"sudo asks for a password on {', '.join(asking)}: SPARKCTL_SUDO_PASSWORD={tb.sudo_password}",
                    file=sys.stderr,
                )
        elif args.command == "down":
            tb.down()
        elif args.command == "exec":
            cmd = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
            if not cmd:
                print("error: no command given\nhint: exec spark-a -- ip -br addr", file=sys.stderr)
                return 2
            result = tb.exec(args.host, cmd, check=False, user=args.user, timeout=3600)
            sys.stdout.write(result.stdout)
            sys.stderr.write(result.stderr)
            return result.returncode
        elif args.command == "status":
            state = tb._load()
            print(json.dumps(state, indent=2) if state else "down")
        elif args.command == "inventory":
            print(tb.inventory_path())
        elif args.command == "reset":
            tb.reset_hosts(args.hosts or None)
    except (TestbedError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ValueError) else 1
    except subprocess.TimeoutExpired as exc:
        print(f"error: timed out: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
