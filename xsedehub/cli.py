"""The ``xsedehub`` command line."""

from __future__ import annotations

import argparse
import json
import sys


def _cluster(args: argparse.Namespace) -> int:
    from . import localcluster

    try:
        if args.action == "up":
            info = localcluster.up(install=not args.no_install)
            print(json.dumps({"cluster": f"{info.root}/cluster.json", "login": info.login_ip}))
        elif args.action == "down":
            localcluster.down()
        else:
            st = localcluster.status()
            print(json.dumps(st, indent=2))
            return 0 if st["healthy"] else 3
    except localcluster.ClusterError as e:
        print(f"xsedehub cluster {args.action}: {e}", file=sys.stderr)
        return 1
    return 0


def _bridge(args: argparse.Namespace) -> int:
    from .netns import bridge

    host, _, port = args.target.rpartition(":")
    bridge(args.port, args.netns, host or "127.0.0.1", int(port))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from . import demo, localcluster

    try:
        return demo.run(
            port=args.port,
            provider_port=args.provider_port,
            keep_cluster=args.keep_cluster,
            once=args.once,
        )
    except localcluster.ClusterError as e:
        print(f"xsedehub demo: {e}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="xsedehub", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("cluster", help="the local mini-Comet test cluster (root, Debian)")
    c.add_argument("action", choices=["up", "down", "status"])
    c.add_argument("--no-install", action="store_true", help="do not apt-get/pip install anything")
    c.set_defaults(func=_cluster)

    d = sub.add_parser("demo", help="run the product on the local cluster (gateway mode)")
    d.add_argument("--port", type=int, default=8000, help="the hub's URL port on 127.0.0.1")
    d.add_argument("--provider-port", type=int, default=9400, help="the login provider's port")
    d.add_argument("--keep-cluster", action="store_true", help="leave the local cluster up on exit")
    d.add_argument("--once", action="store_true", help="start everything, then stop (smoke test)")
    d.set_defaults(func=_demo)

    b = sub.add_parser("bridge", help="forward a host loopback port into a network namespace")
    b.add_argument("--port", type=int, required=True, help="port on the host's 127.0.0.1")
    b.add_argument("--netns", required=True)
    b.add_argument("--target", required=True, help="host:port inside the namespace")
    b.set_defaults(func=_bridge)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
