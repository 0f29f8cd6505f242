"""The ``xsedehub`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _cluster(args: argparse.Namespace) -> int:
    from .testbed import localcluster

    try:
        if args.action == "install":
            localcluster.install()
        elif args.action == "up":
            info = localcluster.up()
            logins = {name: site["login_ip"] for name, site in info.clusters.items()}
            print(
                json.dumps(
                    {
                        "cluster": f"{info.root}/cluster.json",
                        "login": info.login_ip,
                        "logins": logins,
                    }
                )
            )
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
    from .testbed.netns import bridge

    host, _, port = args.target.rpartition(":")
    bridge(args.port, args.netns, host or "127.0.0.1", int(port))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .testbed import demo, localcluster

    try:
        return demo.run(
            port=args.port,
            provider_port=args.provider_port,
            workdir=Path(args.workdir),
            keep_cluster=args.keep_cluster,
            once=args.once,
            mode=args.mode,
            issuer_port=args.issuer_port,
        )
    except localcluster.ClusterError as e:
        print(f"xsedehub demo: {e}", file=sys.stderr)
        return 1


def _duration(text: str) -> int:
    """``4h``, ``90m``, ``3600`` (seconds) -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    t = text.strip().lower()
    if t and t[-1] in units:
        return int(float(t[:-1]) * units[t[-1]])
    return int(t)


def _issuer(args: argparse.Namespace) -> int:
    import logging

    from . import issuer_service

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    host, _, port = args.listen.rpartition(":")
    host = host or "127.0.0.1"
    try:
        # refuse an unprotected listen address before reading any key or secret
        problem = issuer_service.listen_problem(host, args.certfile)
        if problem:
            raise issuer_service.ConfigProblem(problem)
        cfg = issuer_service.IssuerConfig(
            ca_key=args.ca_key,
            oidc_issuer=args.oidc_issuer,
            jwks_url=args.jwks_url or "",
            client_id=args.client_id,
            hub_secret=issuer_service.read_secret_file(args.hub_secret_file),
            lifetime=_duration(args.lifetime),
            claim=args.claim,
            strip_domain=tuple(args.strip_domain) if args.strip_domain else None,
            mapping=issuer_service.load_mapping(args.map),
            allowed_idps=args.allowed_idp,
            deny_accounts=[*issuer_service.DEFAULT_DENY, *args.deny_account],
            min_uid=args.min_uid,
            source_addresses=args.source_address,
        )
        cfg.check()
        issuer_service.serve(cfg, host, int(port), certfile=args.certfile, keyfile=args.keyfile)
    except issuer_service.ConfigProblem as e:
        print(f"xsedehub issuer: {e}", file=sys.stderr)
        return 2
    return 0


def _gateway(args: argparse.Namespace) -> int:
    from pathlib import Path

    import asyncssh

    from . import gatewaysetup
    from .spawner.validate import InvalidValue

    try:
        if args.key.endswith(".pub"):
            public = Path(args.key).read_text()
        else:
            public = asyncssh.read_private_key(args.key).export_public_key().decode()
        keys_file = args.keys_file or f"/etc/ssh/xsedehub/{args.user}.keys"
        text = gatewaysetup.instructions(args.user, public, args.hub_address, keys_file)
    except (OSError, asyncssh.KeyImportError, InvalidValue) as e:
        print(f"xsedehub gateway setup: {e}", file=sys.stderr)
        return 2
    print(text, end="")
    return 0


def _tunnel(args: argparse.Namespace) -> int:
    from pathlib import Path

    from . import tunnelsetup

    p = tunnelsetup.plan(Path(args.sshd_config), Path(args.keys_file), args.user, args.hub_api)
    if not p.changes:
        print("nothing to change: the tunnel account and its sshd block are in place")
        return 0
    if not p.account_exists:
        print(f"will create the account {args.user} (no shell, no password)")
    if not p.keys_file.exists():
        print(f"will create {p.keys_file} (0644, managed by the hub)")
    if p.diff:
        print(p.diff, end="")
    if not args.apply:
        print("\n(dry run: nothing written; run again with --apply)")
        return 0
    try:
        tunnelsetup.apply_plan(p, sshd=args.sshd)
    except RuntimeError as e:
        print(f"xsedehub tunnel setup: {e}", file=sys.stderr)
        return 1
    print("written; reload sshd to take effect (e.g. kill -HUP $(cat /run/sshd.pid))")
    return 0


def _check(args: argparse.Namespace) -> int:
    from .check import run_check, tljh_config_file

    cert = (args.key, args.certificate) if args.certificate else None
    config = args.config
    if args.tljh:
        try:
            config = tljh_config_file()
        except FileNotFoundError as e:
            print(f"xsedehub check --tljh: {e}", file=sys.stderr)
            return 2
        print(f"checking TLJH's {config}")
    report = run_check(
        config,
        job_timeout=args.job_timeout,
        certificate=cert,
        hub_api=args.hub_api,
        cluster=args.cluster or "",
    )
    print(report.summary())
    return 1 if report.failed else 0


def _orphans(args: argparse.Namespace) -> int:
    import os

    import requests

    from .orphans import OrphansError, find_orphans
    from .spawner.errors import ClusterUnreachable

    token = os.environ.get("JUPYTERHUB_API_TOKEN", "")
    if not token:
        print(
            "set JUPYTERHUB_API_TOKEN to a hub token with admin:server_state and read:users",
            file=sys.stderr,
        )
        return 2
    if args.min_age < 0:
        print("--min-age must be 0 or more seconds", file=sys.stderr)
        return 2
    cert = (args.key, args.certificate) if args.certificate else None
    try:
        find_orphans(
            args.config,
            args.hub_url,
            token,
            cancel=args.cancel,
            min_age=args.min_age,
            certificate=cert,
            cluster=args.cluster or "",
        )
    except (OrphansError, ClusterUnreachable, PermissionError) as e:
        print(f"xsedehub orphans: {e}", file=sys.stderr)
        return 1
    except requests.RequestException as e:
        print(f"xsedehub orphans: the hub could not be asked: {e}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="xsedehub", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser(
        "cluster", help="the local test clusters: mini-Comet and minidelta (root, Debian)"
    )
    c.add_argument(
        "action",
        choices=["install", "up", "down", "status"],
        help="install: Debian packages and the job environment (needs the network; "
        "scripts/install.sh runs it); up: start it (installs nothing); down: stop "
        "everything up started; status: what runs (exit 3 when not healthy)",
    )
    c.set_defaults(func=_cluster)

    d = sub.add_parser("demo", help="run the product on the local cluster (either mode)")
    d.add_argument(
        "--mode",
        choices=["gateway", "xsede"],
        default="gateway",
        help="gateway: GitHub-like login, shared account; xsede: CILogon-like login, "
        "per-user certificates from the reference issuer, jobs as alice or bob",
    )
    d.add_argument("--port", type=int, default=8000, help="the hub's URL port on 127.0.0.1")
    d.add_argument("--provider-port", type=int, default=9400, help="the login provider's port")
    d.add_argument(
        "--issuer-port", type=int, default=8700, help="the certificate issuer's port (xsede mode)"
    )
    d.add_argument(
        "--workdir",
        default="/var/lib/xsedehub/demo",
        help="where the hub's config, database and logs go",
    )
    d.add_argument("--keep-cluster", action="store_true", help="leave the local cluster up on exit")
    d.add_argument("--once", action="store_true", help="start everything, then stop (smoke test)")
    d.set_defaults(func=_demo)

    i = sub.add_parser("issuer", help="run the reference SSH certificate issuer")
    i.add_argument("--ca-key", required=True, help="the user CA's private key (sshd trusts it)")
    i.add_argument(
        "--oidc-issuer",
        required=True,
        help="the OpenID provider's issuer URL, the 'iss' of its ID tokens "
        "(https://cilogon.org); its signing keys come from its discovery document",
    )
    i.add_argument("--jwks-url", help="the provider's JWKS URL (default: from discovery)")
    i.add_argument(
        "--client-id",
        required=True,
        help="the hub's OAuth client id at the provider: ID tokens must be issued to it",
    )
    i.add_argument(
        "--hub-secret-file",
        required=True,
        help="0600 file with the secret the hub sends (XSEDECILogonAuthenticator."
        "issuer_secret_file holds the same); openssl rand -hex 32",
    )
    i.add_argument("--listen", default="127.0.0.1:8700", help="host:port to serve on")
    i.add_argument("--lifetime", default="4h", help="certificate lifetime (e.g. 4h, 90m)")
    i.add_argument("--claim", default="eppn", help="ID-token claim that names the user")
    i.add_argument(
        "--allowed-idp",
        action="append",
        default=[],
        required=True,
        help="accept identities from this identity provider (the ID token's 'idp' claim; "
        "repeatable, at least one)",
    )
    i.add_argument(
        "--strip-domain",
        nargs=2,
        metavar=("IDP", "DOMAIN"),
        help="accept <name>@DOMAIN in --claim as account <name>, from identity provider IDP only",
    )
    i.add_argument(
        "--map",
        help="JSON file {identity provider: {claim value: account}}, checked first",
    )
    i.add_argument(
        "--deny-account",
        action="append",
        default=[],
        help="never issue for this account (repeatable; root and other system accounts "
        "are always refused)",
    )
    i.add_argument(
        "--min-uid",
        type=int,
        default=1000,
        help="refuse accounts that exist here with a uid below this",
    )
    i.add_argument(
        "--source-address",
        action="append",
        default=[],
        help="restrict certificates to these client addresses/CIDRs (the hub)",
    )
    i.add_argument("--certfile", help="TLS certificate (serve HTTPS; needed off loopback)")
    i.add_argument("--keyfile", help="TLS key")
    i.set_defaults(func=_issuer)

    t = sub.add_parser("tunnel", help="set up the hub side of the tunnel (account, sshd block)")
    t.add_argument("action", choices=["setup"], help="setup: the only action")
    t.add_argument(
        "--sshd-config",
        default="/etc/ssh/sshd_config",
        help="the hub's sshd configuration, where the Match block goes",
    )
    t.add_argument(
        "--keys-file",
        default="/etc/xsedehub/tunnelbot_authorized_keys",
        help="the authorized_keys file the hub manages (SlurmSSHSpawner.tunnel_authorized_keys)",
    )
    t.add_argument(
        "--user",
        default="tunnelbot",
        help="the no-shell tunnel account to create (SlurmSSHSpawner.tunnel_user)",
    )
    t.add_argument(
        "--hub-api",
        default="127.0.0.1:8081",
        help="the hub API address jobs may forward to (TLJH: 127.0.0.1:15001)",
    )
    t.add_argument("--sshd", default="/usr/sbin/sshd", help="sshd binary used to test the config")
    t.add_argument("--apply", action="store_true", help="write the changes (default: show them)")
    t.set_defaults(func=_tunnel)

    g = sub.add_parser(
        "gateway",
        help="print the login node's settings for the shared gateway account (cluster admins)",
    )
    g.add_argument("action", choices=["setup"], help="setup: print the settings (the only action)")
    g.add_argument("--user", default="gateway", help="the shared account (gateway_user)")
    g.add_argument(
        "--key", required=True, help="the hub's key (gateway_key, or its .pub): its public half"
    )
    g.add_argument(
        "--hub-address", required=True, help="the hub's address as the login node sees it"
    )
    g.add_argument("--keys-file", help="root-owned keys file (default /etc/ssh/xsedehub/USER.keys)")
    g.set_defaults(func=_gateway)

    k = sub.add_parser("check", help="check a deployment step by step")
    k.add_argument(
        "-f", "--config", default="jupyterhub_config.py", help="the hub's jupyterhub_config.py"
    )
    k.add_argument(
        "--tljh",
        action="store_true",
        help="check The Littlest JupyterHub's own jupyterhub_config.py (inside the tljh "
        "package of this Python environment) with the settings made by tljh-config",
    )
    k.add_argument(
        "--job-timeout", type=float, default=120, help="seconds to wait for the test job's tunnel"
    )
    k.add_argument("--hub-api", help="hub API host:port (default: from the config)")
    k.add_argument(
        "--certificate",
        help="xsede mode: a user certificate to log in with (without one, the steps after "
        "the login node's host key are skipped, and check prints how to make one)",
    )
    k.add_argument("--key", help="xsede mode: the certificate's private key")
    k.add_argument(
        "--cluster",
        help="check this cluster only (SlurmSSHSpawner.clusters); with --certificate on a "
        "hub with several, required: the certificate goes to that cluster only",
    )
    k.set_defaults(func=_check)

    o = sub.add_parser(
        "orphans",
        help="list (and cancel) jobs the hub no longer knows about; needs JUPYTERHUB_API_TOKEN",
        description="List (and cancel) SLURM jobs xsedehub submitted that no server in the "
        "hub's database holds.  Reads the hub's REST API with the token in "
        "JUPYTERHUB_API_TOKEN (scopes admin:server_state and read:users).  SLURM is "
        "asked before the hub, and jobs younger than --min-age are listed but left alone.  "
        "Exit status: 0 done (orphans or not), 1 squeue, the login, the hub or a scancel "
        "failed, 2 usage.",
    )
    o.add_argument(
        "-f", "--config", default="jupyterhub_config.py", help="the hub's jupyterhub_config.py"
    )
    o.add_argument(
        "--hub-url",
        help="the hub's own URL, which serves /hub/api (default: from the config's "
        "JupyterHub.hub_bind_url, else http://<hub_ip>:<hub_port>: 127.0.0.1:8081 by "
        "default, 127.0.0.1:15001 with TLJH)",
    )
    o.add_argument("--cancel", action="store_true", help="scancel the jobs it lists")
    o.add_argument(
        "--min-age",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="leave alone jobs submitted less than this long ago, which the hub may not "
        "have recorded yet (default: 60)",
    )
    o.add_argument(
        "--certificate", help="xsede mode: a user certificate whose account's jobs to list"
    )
    o.add_argument("--key", help="xsede mode: the certificate's private key")
    o.add_argument(
        "--cluster",
        help="sweep this cluster only (SlurmSSHSpawner.clusters); with --certificate on a "
        "hub with several, required: the certificate goes to that cluster only",
    )
    o.set_defaults(func=_orphans)

    b = sub.add_parser("bridge", help="forward a host loopback port into a network namespace")
    b.add_argument("--port", type=int, required=True, help="port on the host's 127.0.0.1")
    b.add_argument("--netns", required=True, help="the network namespace (e.g. xh-hub)")
    b.add_argument("--target", required=True, help="host:port inside the namespace")
    b.set_defaults(func=_bridge)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
