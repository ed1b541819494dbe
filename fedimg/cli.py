"""``fedimg``: the same domain functions the consumers call, by hand.

    fedimg stage --compose-location URL [--compose-id ID]
    fedimg promote AMI_ID
    fedimg status [--compose ID | --stream] [AMI_ID]
    fedimg reconcile
    fedimg prune [--apply]
    fedimg audit [--fix]
    fedimg policy check FILE
    fedimg policy explain AMI_ID
    fedimg waive AMI_ID TESTCASE [--scenario S] --comment TEXT [--user NAME]
    fedimg retest AMI_ID [--scenario S]

Settings come from the fedmsg config (``./fedmsg.d``, ``/etc/fedmsg.d`` or
``$FEDMSG_CONFIG``); messages are published on the configured bus exactly as
the consumers publish them.
"""

from __future__ import annotations

import argparse
import getpass
import logging
import os
import sys
from collections.abc import Sequence

from fedimg.config import FedimgConfig
from fedimg.messages import Emitter, cli_publisher
from fedimg.settings import ConfigError, load_fedmsg_config, setup_cli_logging

log = logging.getLogger("fedimg")

PUBLISHING = frozenset(
    {"stage", "promote", "reconcile", "retest"}
)  # the commands that send messages


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
    status.add_argument("ami_id", nargs="?", help="only this AMI, with its waivers and history")

    status.add_argument(
        "--stream", action="store_true", help="what prune would keep and remove, by stream"
    )

    sub.add_parser("reconcile", help="resume unfinished work from AWS tags and ResultsDB")

    policy = sub.add_parser("policy", help="the gate policy (fedimg.gate.policy_file)")
    what = policy.add_subparsers(dest="policy_command", required=True)
    check = what.add_parser("check", help="validate a policy file (0 if usable)")
    check.add_argument("file")
    explain = what.add_parser("explain", help="which rules apply to an AMI, what each needs")
    explain.add_argument("ami_id")

    waive = sub.add_parser("waive", help="create a WaiverDB waiver for a result of an AMI")
    waive.add_argument("ami_id")
    waive.add_argument("testcase")
    waive.add_argument("--scenario", help="only this scenario (default: every scenario)")
    waive.add_argument("--comment", required=True, help="why the failure is acceptable")
    waive.add_argument(
        "--user", help="WaiverDB dummy (HTTP basic) user; else $FEDIMG_WAIVERDB_TOKEN"
    )

    retest = sub.add_parser("retest", help="request a new test run of a rejected AMI")
    retest.add_argument("ami_id")
    retest.add_argument("--scenario", help="only this scenario (default: every scenario)")

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
    if args.command == "policy" and args.policy_command == "check":
        return check_policy_file(args.file)
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

        return cli_status(cfg, args.compose, ami_id=args.ami_id, by_stream=args.stream)
    if args.command == "reconcile":
        from fedimg.engine import cli_reconcile

        return cli_reconcile(cfg, emitter, print)
    if args.command == "policy":
        from fedimg.engine import cli_explain

        return cli_explain(cfg, args.ami_id, print)
    if args.command == "waive":
        from fedimg.engine import cli_waive

        return cli_waive(
            cfg,
            args.ami_id,
            args.testcase,
            scenario=args.scenario,
            comment=args.comment,
            user=args.user,
            token=os.environ.get("FEDIMG_WAIVERDB_TOKEN"),
        )
    if args.command == "retest":
        from fedimg.engine import cli_retest

        return cli_retest(cfg, emitter, args.ami_id, args.scenario, who=getpass.getuser())
    if args.command == "prune":
        from fedimg.engine import cli_prune

        return cli_prune(cfg, emitter, args.apply, print)
    if args.command == "audit":
        from fedimg.engine import cli_audit

        return cli_audit(cfg, emitter, args.fix, print)
    raise AssertionError(args.command)


def check_policy_file(path: str) -> int:
    """``fedimg policy check FILE``: 0 and a summary if usable, 2 and why if not."""
    from fedimg.policy import PolicyError, load_policy

    try:
        policy = load_policy(path)
    except PolicyError as exc:
        log.error("%s", exc)
        return 2
    for rule in policy.rules:
        match = {k: sorted(v) for k, v in vars(rule.match).items() if v is not None}
        scenarios = sorted(rule.scenarios) if rule.scenarios is not None else "every one present"
        print(
            f"rule {rule.name}: match {match or 'every image'}; requires"
            f" {', '.join(rule.testcases)} in {scenarios}; if skipped: {rule.if_skipped}"
        )
    print(f"{path}: {len(policy.rules)} rule(s), OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
