"""One full pipeline run, audited from two sides: leaked secrets and the IAM policies.

``tests/test_secrets_integration.py`` and ``tests/test_iam_policy_integration.py``
read the same run (the session fixture ``audited_run`` in tests/conftest.py): a
pipeline run costs tens of seconds and both audit everything one run does.
One ``devel.stack.Stack`` runs the demo's compose (two images released, one
rejected and - with ``fedimg.gate.delete_rejected`` on - deregistered) with:

- AWS credentials that are unmistakable (a fresh random secret key and session
  token; ``devel.motoserver.FAKE_CREDENTIALS`` uses ``testing``, a word fedimg
  logs legitimately as a state, so it could not be searched for);
- every test instance's throwaway private key captured as the hub creates it
  (a ``sitecustomize`` on the hub's ``PYTHONPATH`` records each private key
  paramiko loads);
- logging at DEBUG for fedimg, autocloud_ami, paramiko, urllib3 and the rest,
  except botocore and boto3 at INFO: botocore's DEBUG prints signed request
  headers by design, which is why production must never run it at DEBUG
  (docs/security.md);
- every AWS call of the hub through a recording proxy in this process (so that
  the ids of what a call created are known from its answer), and in moto's own
  recording.

The run ends once every image is released, or rejected and deleted, and
announced; the hub is then stopped so that its log and both recordings are
complete (moto_server, ResultsDB and the bus stay up for the tests' reads).
"""

from __future__ import annotations

import io
import secrets
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from devel.awscalls import AwsCall
from devel.awsproxy import Exchange, RecordingProxy
from devel.bus import Seen, wait_until
from devel.demo import Follower
from devel.stack import Stack, StackOptions
from fedimg import tags

PIPELINE_TIMEOUT: Final = 180.0
KEY_LOG_ENV: Final = "FEDIMG_TEST_KEY_LOG"

#: Loaded by every Python process of the stack whose PYTHONPATH has its directory: records
#: each private key paramiko loads (autocloud_ami.instance.generate_key loads every one).
SITECUSTOMIZE: Final = textwrap.dedent(
    '''
    """Written by tests/audited_run.py: capture every private key paramiko loads."""
    import os

    _LOG = os.environ.get("FEDIMG_TEST_KEY_LOG")
    if _LOG:
        import io
        import json
        import threading

        import paramiko

        _lock = threading.Lock()
        _real = paramiko.PKey.from_private_key.__func__

        def _capture(cls, file_obj, password=None):
            text = file_obj.read()
            with _lock, open(_LOG, "a") as out:
                out.write(json.dumps({"pem": text, "pid": os.getpid()}) + "\\n")
            return _real(cls, io.StringIO(text), password)

        paramiko.PKey.from_private_key = classmethod(_capture)
    '''
)

# Every logger at DEBUG except botocore/boto3 (their DEBUG output is the signed request).
VERBOSE_LOGGING: Final = {
    "version": 1,
    # Loggers made before the hub applies this (paramiko's, imported by the key capture)
    # must keep logging.
    "disable_existing_loggers": False,
    "formatters": {"bare": {"format": "[%(asctime)s][%(name)s %(levelname)s] %(message)s"}},
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": "bare",
            "level": "DEBUG",
            "stream": "ext://sys.stdout",
        }
    },
    "loggers": {
        "botocore": {"level": "INFO"},
        "boto3": {"level": "INFO"},
        "s3transfer": {"level": "INFO"},
    },
    "root": {"level": "DEBUG", "handlers": ["console"]},
}


@dataclass
class AuditedRun:
    stack: Stack  # its hub stopped; moto_server, ResultsDB and the bus still up
    states: dict[str, str]  # image name -> end state ("deleted" for the deregistered reject)
    exchanges: list[Exchange]  # every AWS request of the hub, with its answer (the proxy)
    recorded: list[AwsCall]  # moto_server's own recording of the same calls
    recording: Path  # moto_server's recording file
    key_log: Path  # every private key the stack's processes loaded (JSON lines)
    secret_key: str  # the AWS secret access key the stack ran with
    token: str  # the AWS session token the stack ran with
    messages: list[Seen]  # every message seen on the bus
    hub_log: str


def images_settled(stack: Stack, follower: Follower) -> dict[str, str] | None:
    """image name -> end state once every image reached it (and was announced); else None."""
    assert stack.tree is not None
    ec2 = stack.ec2(stack.options.staging_region)
    found = ec2.describe_images(
        Owners=["self"],
        Filters=[{"Name": f"tag:{tags.COMPOSE_ID}", "Values": [stack.options.compose_id]}],
    )["Images"]
    staged = {
        tags.as_dict(i.get("Tags")).get(tags.IMAGE_NAME): tags.as_dict(i.get("Tags")).get(
            tags.STATE
        )
        for i in found
        if tags.SOURCE_AMI not in tags.as_dict(i.get("Tags"))
    }
    bodies = [(m.topic, m.body) for m in follower.messages()]
    states = {}
    for name, expected in stack.expected().items():
        if expected == "rejected":
            failed = any(
                t.endswith("fedimg.image.test")
                and b.get("status") == "failed"
                and b.get("image_name") == name
                for t, b in bodies
            )
            if not failed or name in staged:
                return None
            states[name] = "deleted"
        else:
            released = any(
                t.endswith("fedimg.image.release") and b.get("image_name") == name
                for t, b in bodies
            )
            if staged.get(name) != "released" or not released:
                return None
            states[name] = "released"
    return states


def audited_run(here: Path) -> Iterator[AuditedRun]:
    """Run the pipeline once as the module docstring says; yield it, then tear it down."""
    site = here / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    key_log = here / "private-keys.jsonl"
    secret_key = "fedimgSECRET" + secrets.token_urlsafe(24)
    token = "fedimgTOKEN" + secrets.token_urlsafe(48)
    proxy = RecordingProxy()
    options = StackOptions(
        record_aws=True,
        aws_proxy=proxy.attach,  # the hub's AWS_ENDPOINT_URL; the tests' own reads go direct
        extra_settings={"logging": VERBOSE_LOGGING, "fedimg.gate.delete_rejected": True},
        extra_env={
            "AWS_SECRET_ACCESS_KEY": secret_key,
            "AWS_SESSION_TOKEN": token,
            # botocore reads this one first, and tests/conftest.py sets it.
            "AWS_SECURITY_TOKEN": token,
            "PYTHONPATH": str(site),
            KEY_LOG_ENV: str(key_log),
        },
    )
    with proxy, Stack(options) as stack:
        follower = Follower(stack, io.StringIO())
        replay = stack.replay()
        assert replay.returncode == 0, replay.stdout + replay.stderr
        holder: dict[str, dict[str, str]] = {}

        def settled() -> bool:
            states = images_settled(stack, follower)
            if states is not None:
                holder["states"] = states
            return states is not None

        wait_until(
            settled, PIPELINE_TIMEOUT, "every image released, or rejected and deleted", interval=0.5
        )
        # The hub keeps polling (reconcile, sweep): stop it, let its last calls finish, so
        # that its log is whole and moto's recording and the proxy's hold the same calls.
        assert stack.hub is not None and stack.moto is not None
        assert stack.bus is not None and stack.bus.tap is not None
        stack.hub.stop()
        wait_until(proxy.idle, 60, "the proxy to finish its last requests", interval=0.05)
        yield AuditedRun(
            stack=stack,
            states=holder["states"],
            exchanges=list(proxy.snapshot()),
            recorded=stack.moto.recorded_calls(),
            recording=stack.moto.recording_path,
            key_log=key_log,
            secret_key=secret_key,
            token=token,
            messages=list(stack.bus.tap.messages()),
            hub_log=stack.hub.output(),
        )
