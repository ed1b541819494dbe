"""What moto 5.2 lacks of the AWS APIs fedimg calls, answered inside moto (devel and tests only).

moto 5.2.5 answers HTTP 500 for ``EnableImageDeprecation`` and
``GetImageBlockPublicAccessState`` and knows no ``ec2`` quota in Service
Quotas (``L-0E3CBAB9``, public AMIs per region, answers NoSuchResource).
``install()`` teaches moto exactly these, in process answers one call at a
time (moto's backends are not thread-safe), and lists once what moto lists on
every request (a response class's methods, its own package's modules: CPU
that competes with the code under test on the same cores), nothing else:

* ``EnableImageDeprecation`` keeps ``DeprecateAt`` on the AMI (DescribeImages
  shows it as ``DeprecationTime``); AWS also refuses a time in the past, which
  this does not check (tests run on fixed clocks): ``fedimg.plan.deprecation_time``
  never asks for one, as its table tests show;
* ``Enable/Disable/GetImageBlockPublicAccessState`` keep the per-region state
  (``unblocked`` until a test turns it on with the real API call);
* ``GetServiceQuota(ec2, L-0E3CBAB9)`` answers ``public_ami_quota``: AWS's
  default, 5, in process (a test sets another with ``set_public_ami_quota``);
  ``FEDIMG_DEVEL_PUBLIC_AMI_QUOTA`` in the environment, which
  ``devel.motoserver`` sets to a raised 1000 for the stacks.

It is installed in the ``moto_server`` of the devel stack (``python -m
devel.motoextra`` runs moto_server with it: the calls are in moto's own
recording, which the IAM policy test reads) and in process for the unit tests
(``tests/__init__.py``). Production code never sees it: against real AWS these
calls reach AWS, and an HTTP 500 there stays an error.
"""

from __future__ import annotations

import functools
import os
import threading
from datetime import UTC, datetime
from typing import Any, Final

PUBLIC_AMI_QUOTA_CODE: Final = "L-0E3CBAB9"
DEFAULT_PUBLIC_AMI_QUOTA: Final = 5.0
BLOCK_STATES: Final = frozenset({"block-new-sharing", "unblocked"})

_lock = threading.Lock()
_block: dict[tuple[str, str], str] = {}  # (account, region) -> state
_quota: dict[tuple[str, str], float] = {}  # (account, region) -> public AMIs allowed
_installed: set[str] = set()  # {"moto"} once installed


def public_ami_quota(account: str, region: str) -> float:
    """The public-AMI quota the stand-in reports for ``region``."""
    with _lock:
        if (account, region) in _quota:
            return _quota[(account, region)]
    return float(os.environ.get("FEDIMG_DEVEL_PUBLIC_AMI_QUOTA", DEFAULT_PUBLIC_AMI_QUOTA))


def set_public_ami_quota(account: str, region: str, value: float) -> None:
    """Set the quota of one region (what a quota increase would do in AWS)."""
    with _lock:
        _quota[(account, region)] = float(value)


def reset() -> None:
    """Forget every block state and quota (as moto's own reset forgets resources)."""
    with _lock:
        _block.clear()
        _quota.clear()


def _parse_time(value: str) -> datetime:
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def install() -> None:
    """Add the missing calls to moto's EC2 and Service Quotas responses (idempotent)."""
    with _lock:
        if _installed:
            return
        _installed.add("moto")
    import moto.backends as moto_backends
    import moto.core.responses as moto_responses
    from moto.core.botocore_stubber import BotocoreStubber
    from moto.core.responses import ActionResult
    from moto.ec2.exceptions import InvalidParameterValueError
    from moto.ec2.responses import EC2Response
    from moto.servicequotas.models import ServiceQuotasBackend

    # moto in process answers in the calling thread, and its backends are plain dicts: two
    # threads of the code under test (staging workers, copy fan-out) calling at once made
    # moto raise "dictionary changed size during iteration" (AWS answers both). One call
    # at a time. (moto_server's threads race the same way; there it is an HTTP 500, which
    # botocore retries.)
    serial = threading.RLock()
    process_request = BotocoreStubber.process_request

    def serialized(self: Any, request: Any) -> Any:
        with serial:
            return process_request(self, request)

    BotocoreStubber.process_request = serialized

    # moto lists a response class's methods (inspect.getmembers) on every request, a
    # twentieth of its CPU per call: listed once per class instead. The classes are
    # complete before any request (the methods below are added within this call).
    moto_responses.method_names_from_class = functools.cache(moto_responses.method_names_from_class)
    # moto_server finds the service of every request by listing moto's package directory
    # (a stat per module, about 170) under one lock: the package does not change while it
    # runs, so it is listed once.
    modules = tuple(moto_backends.list_of_moto_modules())
    moto_backends.list_of_moto_modules = lambda: modules

    def enable_image_deprecation(self: Any) -> Any:
        ami_id = self._get_param("ImageId")
        when = _parse_time(str(self._get_param("DeprecateAt")))
        if when <= datetime.now(UTC):
            raise InvalidParameterValueError(f"DeprecateAt {when.isoformat()} is in the past")
        (image,) = self.ec2_backend.describe_images(ami_ids=[ami_id])
        image.deprecation_time = when.strftime("%Y-%m-%dT%H:%M:%S.000Z")
        return ActionResult({"Return": True})

    def get_image_block_public_access_state(self: Any) -> Any:
        with _lock:
            state = _block.get((self.current_account, self.region), "unblocked")
        return ActionResult({"ImageBlockPublicAccessState": state, "ManagedBy": "account"})

    def enable_image_block_public_access(self: Any) -> Any:
        state = str(self._get_param("ImageBlockPublicAccessState"))
        if state not in BLOCK_STATES - {"unblocked"}:
            raise InvalidParameterValueError(state)
        with _lock:
            _block[(self.current_account, self.region)] = state
        return ActionResult({"ImageBlockPublicAccessState": state})

    def disable_image_block_public_access(self: Any) -> Any:
        with _lock:
            _block.pop((self.current_account, self.region), None)
        return ActionResult({"ImageBlockPublicAccessState": "unblocked"})

    EC2Response.enable_image_deprecation = enable_image_deprecation
    EC2Response.get_image_block_public_access_state = get_image_block_public_access_state
    EC2Response.enable_image_block_public_access = enable_image_block_public_access
    EC2Response.disable_image_block_public_access = disable_image_block_public_access

    moto_get_service_quota = ServiceQuotasBackend.get_service_quota

    def get_service_quota(self: Any, service_code: str, quota_code: str) -> dict[str, Any]:
        if (service_code, quota_code) != ("ec2", PUBLIC_AMI_QUOTA_CODE):
            return moto_get_service_quota(self, service_code, quota_code)
        return {
            "ServiceCode": "ec2",
            "ServiceName": "Amazon Elastic Compute Cloud (Amazon EC2)",
            "QuotaArn": f"arn:aws:servicequotas:{self.region_name}:{self.account_id}:"
            f"ec2/{PUBLIC_AMI_QUOTA_CODE}",
            "QuotaCode": PUBLIC_AMI_QUOTA_CODE,
            "QuotaName": "Public AMIs",
            "Value": public_ami_quota(self.account_id, self.region_name),
            "Unit": "None",
            "Adjustable": True,
            "GlobalQuota": False,
        }

    ServiceQuotasBackend.get_service_quota = get_service_quota


def main() -> None:
    """``moto_server`` with the stand-ins installed (same arguments)."""
    install()
    from moto.server import main as moto_main

    moto_main()


if __name__ == "__main__":
    main()


__all__ = ["install", "public_ami_quota", "reset", "set_public_ami_quota"]
