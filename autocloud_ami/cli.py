"""``autocloud-ami``: the consumer's job and the sweeper, by hand.

    autocloud-ami test AMI_ID --region REGION   test one staged AMI, print a table
    autocloud-ami sweep                         remove leaked resources, re-send spooled results

``test`` reads the compose id, image name, architecture and subvariant from
the AMI's fedimg tags (override any with options for an AMI fedimg did not
stage), runs exactly the job the consumer runs - same instance, suite,
ResultsDB results and ``autocloud.ami.*`` messages (``--no-publish`` keeps
them off the bus) - prints one line per test and exits 0 when the summary
PASSED, 1 when it FAILED, 2 when the test could not be started.

Settings come from the fedmsg config (``./fedmsg.d``, ``/etc/fedmsg.d`` or
``$FEDMSG_CONFIG``), as fedmsg-hub reads them.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

from botocore.exceptions import BotoCoreError, ClientError

from autocloud_ami.config import AutocloudConfig
from fedimg.aws import error_code
from fedimg.messages import Emitter, InvalidMessage, StagedImage, cli_publisher
from fedimg.settings import ConfigError, load_fedmsg_config, setup_cli_logging

log = logging.getLogger("autocloud_ami")

# fedimg's tag keys (fedimg/tags.py), read as plain strings: the contract is the tags.
TAG_COMPOSE_ID = "fedimg:compose-id"
TAG_IMAGE_NAME = "fedimg:image-name"
TAG_ARCH = "fedimg:arch"
TAG_SUBVARIANT = "fedimg:subvariant"
TAG_RELEASE = "fedimg:release"
TAG_IMAGE_URL = "fedimg:image-url"

EXIT_PASSED, EXIT_FAILED, EXIT_ERROR = 0, 1, 2


class CliError(Exception):
    """The command cannot start; the text says why."""


def request_from_tags(
    ami: Mapping[str, Any], region: str, overrides: Mapping[str, str | None]
) -> StagedImage:
    """The test request recorded in a described AMI's fedimg tags (pure)."""
    tags = {t["Key"]: t["Value"] for t in ami.get("Tags") or ()}

    def pick(option: str, tag: str, required: bool = True) -> str:
        value = overrides.get(option) or tags.get(tag, "")
        if required and not value:
            raise CliError(
                f"{ami.get('ImageId')}: no {tag} tag (not staged by fedimg?); pass --{option}"
            )
        return value

    try:
        return StagedImage(
            compose_id=pick("compose-id", TAG_COMPOSE_ID),
            image_name=pick("image-name", TAG_IMAGE_NAME),
            image_url=tags.get(TAG_IMAGE_URL, ""),
            architecture=pick("arch", TAG_ARCH),
            region=region,
            ami_id=str(ami["ImageId"]),
            subvariant=pick("subvariant", TAG_SUBVARIANT, required=False),
            release=tags.get(TAG_RELEASE, ""),
        )
    except InvalidMessage as exc:
        raise CliError(f"{ami.get('ImageId')}: bad fedimg tags: {exc}") from exc


def describe_ami(ec2: Any, ami_id: str, region: str) -> dict[str, Any]:
    try:
        images = ec2.describe_images(ImageIds=[ami_id])["Images"]
    except ClientError as exc:
        raise CliError(f"{ami_id} in {region}: {error_code(exc)}") from exc
    except BotoCoreError as exc:
        raise CliError(f"{ami_id} in {region}: {exc}") from exc
    if not images:
        raise CliError(f"{ami_id}: no such AMI in {region}")
    return dict(images[0])


def print_table(result: Any, out: TextIO) -> None:
    """Per scenario one line per test, then its summary (``result``: a job.JobResult)."""
    from autocloud_ami.report import outcome_name

    for scenario in result.scenarios:
        rows = [
            (o.test_id, "yes" if o.gating else "no", outcome_name(o.outcome), o.note)
            for o in scenario.report.outcomes
        ]
        width = max([len("TEST"), *(len(r[0]) for r in rows)])
        out.write(f"scenario {scenario.scenario} (job {scenario.job_id})\n")
        out.write(f"{'TEST':{width}}  GATING  OUTCOME  NOTE\n")
        for test_id, gating, outcome, note in rows:
            out.write(f"{test_id:{width}}  {gating:6}  {outcome:7}  {note}\n")
        summary = scenario.results[-1]
        passed, failed = scenario.report.counts()
        out.write(
            f"{summary.testcase}: {summary.outcome} ({passed} passed, {failed} failed) - "
            f"{summary.note}\n\n"
        )
    out.write(f"AMI {result.image.ami_id} in {result.image.region}, job {result.job_id}\n")
    if result.results_url:
        out.write(f"output: {result.results_url}\n")
    if result.delivery is not None and not result.delivery.complete:
        out.write(f"ResultsDB unavailable: {result.delivery.pending} results spooled\n")
    if result.cleanup_errors:
        out.write("cleanup incomplete: " + "; ".join(result.cleanup_errors) + "\n")


def cmd_test(cfg: AutocloudConfig, emitter: Emitter, args: argparse.Namespace, out: TextIO) -> int:
    from autocloud_ami.job import Deps, InvalidRequest, test_ami

    deps = Deps.from_config(cfg, emitter)
    ami = describe_ami(deps.aws.ec2(args.region), args.ami_id, args.region)
    overrides = {
        "compose-id": args.compose_id,
        "image-name": args.image_name,
        "arch": args.arch,
        "subvariant": args.subvariant,
    }
    request = request_from_tags(ami, args.region, overrides)
    try:
        result = test_ami(request, deps)
    except InvalidRequest as exc:
        raise CliError(str(exc)) from exc
    print_table(result, out)
    return EXIT_PASSED if result.passed else EXIT_FAILED


def cmd_sweep(cfg: AutocloudConfig, out: TextIO) -> int:
    from autocloud_ami.job import reporter_for
    from autocloud_ami.sweeper import sweep
    from fedimg.aws import AwsClients

    aws = AwsClients(max_attempts=cfg.aws_max_attempts, component="autocloud_ami")
    report = sweep(aws.ec2, cfg.regions, lifetime=cfg.deadline, poll=cfg.poll_interval)
    done = reporter_for(cfg).flush()
    out.write(
        f"terminated {len(report.terminated)} instances, deleted {len(report.key_pairs)} key "
        f"pairs and {len(report.security_groups)} security groups, kept {report.kept}\n"
    )
    out.write(
        f"spool: {done.posted} posted, {done.rejected} rejected, {done.pending} still pending\n"
    )
    for error in report.errors:
        out.write(f"error: {error}\n")
    return EXIT_ERROR if report.errors else EXIT_PASSED


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="autocloud-ami", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument(
        "--no-publish", action="store_true", help="do not publish messages on the bus"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    test = sub.add_parser("test", help="test one AMI on an EC2 instance, report to ResultsDB")
    test.add_argument("ami_id")
    test.add_argument("--region", required=True, help="the region the AMI is in")
    test.add_argument("--compose-id", help="instead of the fedimg:compose-id tag")
    test.add_argument("--image-name", help="instead of the fedimg:image-name tag")
    test.add_argument("--arch", help="instead of the fedimg:arch tag")
    test.add_argument("--subvariant", help="instead of the fedimg:subvariant tag")
    sub.add_parser("sweep", help="remove leaked test resources, re-send spooled results")
    return parser


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_cli_logging(args.verbose)
    stdout = out or sys.stdout
    try:
        raw = load_fedmsg_config()
        cfg = AutocloudConfig.from_fedmsg(raw)
        # Checked before any work: a bus that cannot publish would fail at the first message.
        publisher = cli_publisher(not args.no_publish and args.command == "test", raw)
    except ConfigError as exc:
        log.error("bad fedmsg config: %s", exc)
        return EXIT_ERROR
    try:
        if args.command == "test":
            return cmd_test(cfg, Emitter(publisher), args, stdout)
        if args.command == "sweep":
            return cmd_sweep(cfg, stdout)
    except CliError as exc:
        log.error("%s", exc)
        return EXIT_ERROR
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
