"""``swarmnode swarm``: a private swarm's owner key and membership certificates (node/runtime/private_swarm.py).

    swarmnode swarm create lab --home ~/.swarmnode          # owner key <home>/owners/lab.key; this node a member
    swarmnode swarm id --home /srv/bob                      # a would-be member's peer id, to send to the owner
    swarmnode swarm invite 12D3KooW... --swarm lab --days 90 --out bob.cert   # the owner signs a certificate
    swarmnode swarm join-cert bob.cert --home /srv/bob      # the member checks it and keeps it (<home>/swarm.cert)
    swarmnode run --swarm lab --join ...                    # both then run the swarm as a private one

Members refuse the records, jobs, rounds and stream requests of every peer without a certificate of the swarm
(node/runtime/admission.py): this p2pd has no pre-shared-key option, so the protocol does it.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

from node.runtime.errors import EXIT_USAGE, NodeError

DEFAULT_DAYS = 365.0


def add_parser(sub, add_common) -> None:
    swarm = sub.add_parser("swarm", help="a private swarm: owner key, membership certificates (members refuse "
                                         "every peer without one)",
                           description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    swarm_sub = swarm.add_subparsers(dest="swarm_command", required=True)
    create = swarm_sub.add_parser("create", help="make this home the owner of private swarm NAME (an owner key in "
                                                 "<home>/owners/) and give this node its certificate")
    add_common(create)
    create.add_argument("swarm", metavar="NAME", help="the swarm's name, as nodes run it (--swarm NAME)")
    create.add_argument("--days", type=float, default=DEFAULT_DAYS,
                        help=f"this node's certificate is valid this long (default {DEFAULT_DAYS:g})")
    ident = swarm_sub.add_parser("id", help="print this home's peer id (made if new): what the owner invites")
    add_common(ident)
    invite = swarm_sub.add_parser("invite", help="sign a membership certificate for PEER_ID (run by the owner)")
    add_common(invite)
    invite.add_argument("peer_id", metavar="PEER_ID", help="the member's peer id (`swarmnode swarm id` on its home)")
    invite.add_argument("--swarm", help="which swarm this home owns (default: the only one)")
    invite.add_argument("--days", type=float, default=DEFAULT_DAYS,
                        help=f"how long the certificate admits the member (default {DEFAULT_DAYS:g})")
    invite.add_argument("--out", type=pathlib.Path,
                        help="the certificate file to write (default ./SWARM-PEERSUFFIX.cert); hand it to the member")
    join = swarm_sub.add_parser("join-cert", help="check a certificate for this home's node and keep it "
                                                  "(<home>/swarm.cert, or the config's swarm_cert)")
    add_common(join)
    join.add_argument("file", metavar="FILE", type=pathlib.Path, help="the certificate file the owner sent")


def _identity(config) -> str:
    from node.runtime.identity import load_or_create_key
    from protocol.records.peer_keys import peer_id_of

    key, _ = load_or_create_key(config.identity_path)
    return peer_id_of(key.public_key())


def _owned(home: pathlib.Path) -> list[str]:
    return sorted(p.stem for p in (home / "owners").glob("*.key"))


def _show(cert, as_json: bool, lines: list[str]) -> None:
    from node.runtime.private_swarm import cert_to_json

    if as_json:
        print(json.dumps(cert_to_json(cert)))
    else:
        print("\n".join(lines))


def cmd_swarm(args: argparse.Namespace) -> int:
    from node.cli.commands import config_from, self_command
    from node.runtime.home import check_home_writable
    from node.runtime.private_swarm import check_own, create_owner, invite, read_cert_file, write_cert_file

    config = config_from(args)
    home = config.home_dir
    check_home_writable(home)
    if args.swarm_command == "id":
        peer = _identity(config)
        print(json.dumps({"peer_id": peer}) if args.json else peer)
        return 0
    if args.swarm_command == "create":
        peer = _identity(config)
        dest = config.swarm_cert_path
        if dest.exists():
            held = read_cert_file(dest)
            if held.swarm != config.swarm:
                raise NodeError(f"{dest} holds this node's certificate of swarm {held.swarm!r}: move it away to "
                                f"make {config.swarm!r}", EXIT_USAGE)
        owner, created = create_owner(home, config.swarm)
        cert = invite(home, config.swarm, peer, args.days)
        write_cert_file(dest, cert)
        _show(cert, args.json, [
            f"{'created' if created else 'kept'} the owner key of private swarm {config.swarm!r} "
            f"({home / 'owners' / (config.swarm + '.key')}, owner {owner}); keep it safe, it admits members",
            f"this node ({peer}) is a member until {cert.expires} ({dest})",
            f"invite a node:  {self_command()} swarm invite PEER_ID --swarm {config.swarm} --home {home}",
            f"run this one:   {self_command()} run --swarm {config.swarm} --home {home}"])
        return 0
    if args.swarm_command == "invite":
        owned = _owned(home)
        name = args.swarm or (owned[0] if len(owned) == 1 else "")
        if not name:
            raise NodeError(f"this home owns {len(owned)} private swarms ({', '.join(owned) or 'none'}): "
                            + ("name one with --swarm" if owned else "run `swarmnode swarm create NAME` first"),
                            EXIT_USAGE)
        cert = invite(home, name, args.peer_id, args.days)
        out = args.out or pathlib.Path(f"{name}-{args.peer_id[-8:]}.cert")
        write_cert_file(out, cert)
        _show(cert, args.json, [
            f"wrote {out}: {args.peer_id} is a member of {name!r} until {cert.expires}",
            f"hand it to the member, who runs:  {self_command()} swarm join-cert {out.name} --home ITS_HOME"])
        return 0
    cert = check_own(read_cert_file(args.file), _identity(config), str(args.file))
    dest = config.swarm_cert_path
    write_cert_file(dest, cert)
    left = (cert.expires_at - time.time()) / 86400
    _show(cert, args.json, [
        f"this node is a member of private swarm {cert.swarm!r} (owner {cert.owner}) until {cert.expires} "
        f"({left:.0f} days); kept in {dest}",
        f"run it with:  {self_command()} run --swarm {cert.swarm} --home {home} --join MEMBER_ADDR"])
    return 0
