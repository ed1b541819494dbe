"""``fedimg``: the same domain functions the consumers call, by hand.

    fedimg stage --compose-location URL [--compose-id ID]
    fedimg promote AMI_ID
    fedimg status [--compose ID | --stream]
    fedimg reconcile
    fedimg prune [--apply]
    fedimg audit [--fix]

Settings come from the fedmsg config (``./fedmsg.d``, ``/etc/fedmsg.d`` or
``$FEDMSG_CONFIG``); messages are published on the configured bus exactly as
the consumers publish them.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from fedimg.config import FedimgConfig
from fedimg.messages import Emitter, cli_publisher
from fedimg.settings import ConfigError, load_fedmsg_config, setup_cli_logging

log = logging.getLogger("fedimg")

PUBLISHING = frozenset({"stage", "promote", "reconcile"})  # the commands that send messages


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedimg", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument(
        "--no-publish", action="store_true", help="do not publish messages on the bus"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    stage = sub.add_parser("stage", help="stage the cloud images of a compose")
    stage.add_argument("--compose-location", required=True, help="the compose's compose/ URL")
    stage.add_argument("--compose-id", help="compose id (default: from composeinfo.json)")

    promote = sub.add_parser("promote", help="run the gate for a staged AMI and release it")
    promote.add_argument("ami_id")

    status = sub.add_parser("status", help="every staged AMI, its state, tests and copies")
    status.add_argument("--compose", help="only this compose id")
    status.add_argument(
        "--stream", action="store_true", help="what prune would keep and remove, by stream"
    )

    sub.add_parser("reconcile", help="resume unfinished work from AWS tags and ResultsDB")

    prune = sub.add_parser(
        "prune", help="list the old AMIs to remove in every region (a dry run by default)"
    )
    prune.add_argument("--apply", action="store_true", help="remove them (and their snapshots)")

    audit = sub.add_parser("audit", help="check every released AMI is still public everywhere")
    audit.add_argument("--fix", action="store_true", help="make what is private public again")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_cli_logging(args.verbose)
    try:
        raw = load_fedmsg_config()
        cfg = FedimgConfig.from_fedmsg(raw)
        # Checked before any work: a bus that cannot publish would fail at the first message.
        publishes = args.command in PUBLISHING or (args.command == "prune" and args.apply)
        publisher = cli_publisher(not args.no_publish and publishes, raw)
    except ConfigError as exc:
        log.error("bad fedmsg config: %s", exc)
        return 2
    emitter = Emitter(publisher)

    if args.command == "stage":
        from fedimg.engine import cli_stage

        return cli_stage(cfg, emitter, args.compose_location, args.compose_id)
    if args.command == "promote":
        from fedimg.engine import cli_promote

        return cli_promote(cfg, emitter, args.ami_id)
    if args.command == "status":
        from fedimg.status import cli_status

        return cli_status(cfg, args.compose, by_stream=args.stream)
    if args.command == "reconcile":
        from fedimg.engine import cli_reconcile

        return cli_reconcile(cfg, emitter, print)
    if args.command == "prune":
        from fedimg.engine import cli_prune

        return cli_prune(cfg, emitter, args.apply, print)
    if args.command == "audit":
        from fedimg.engine import cli_audit

        return cli_audit(cfg, emitter, args.fix, print)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
