"""devel.motoextra: moto learns exactly the calls it lacks, and nothing of moto's own changes."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError
from moto import mock_aws
from moto.core import DEFAULT_ACCOUNT_ID

from devel import motoextra

SESSION = boto3.session.Session()  # one session: each new one parses the models again


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    monkeypatch.setenv("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")
    with mock_aws():
        yield lambda service, region="us-east-1": SESSION.client(service, region_name=region)
    motoextra.reset()


def test_deprecation_is_kept_on_the_image_and_shown_by_describe(aws: Any) -> None:
    ec2 = aws("ec2")
    ami = ec2.register_image(Name="deprecated-one", RootDeviceName="/dev/sda1")["ImageId"]
    other = ec2.register_image(Name="never-deprecated", RootDeviceName="/dev/sda1")["ImageId"]
    when = datetime(2028, 11, 24, 17, 0, tzinfo=UTC)
    assert ec2.enable_image_deprecation(ImageId=ami, DeprecateAt=when)["Return"] is True
    images = {i["ImageId"]: i for i in ec2.describe_images(ImageIds=[ami, other])["Images"]}
    assert images[ami]["DeprecationTime"] == "2028-11-24T17:00:00.000Z"
    assert "DeprecationTime" not in images[other]
    with pytest.raises(ClientError) as raised:
        ec2.enable_image_deprecation(ImageId="ami-0000000000000000f", DeprecateAt=when)
    assert raised.value.response["Error"]["Code"] == "InvalidAMIID.NotFound"


def test_block_public_access_is_per_region_and_only_known_states(aws: Any) -> None:
    east, west = aws("ec2"), aws("ec2", "eu-west-1")
    assert east.get_image_block_public_access_state()["ImageBlockPublicAccessState"] == "unblocked"
    east.enable_image_block_public_access(ImageBlockPublicAccessState="block-new-sharing")
    assert (
        east.get_image_block_public_access_state()["ImageBlockPublicAccessState"]
        == "block-new-sharing"
    )
    assert west.get_image_block_public_access_state()["ImageBlockPublicAccessState"] == "unblocked"
    with pytest.raises(ClientError):
        east.enable_image_block_public_access(ImageBlockPublicAccessState="unblocked")
    east.disable_image_block_public_access()
    assert east.get_image_block_public_access_state()["ImageBlockPublicAccessState"] == "unblocked"


def test_the_public_ami_quota_and_moto_own_quotas(aws: Any) -> None:
    quotas = aws("service-quotas", "eu-west-1")
    answer = quotas.get_service_quota(ServiceCode="ec2", QuotaCode="L-0E3CBAB9")["Quota"]
    assert answer["Value"] == 5.0 and answer["QuotaCode"] == "L-0E3CBAB9"
    motoextra.set_public_ami_quota(DEFAULT_ACCOUNT_ID, "eu-west-1", 7)
    assert (
        quotas.get_service_quota(ServiceCode="ec2", QuotaCode="L-0E3CBAB9")["Quota"]["Value"] == 7.0
    )
    other = aws("service-quotas", "us-west-2")
    assert (
        other.get_service_quota(ServiceCode="ec2", QuotaCode="L-0E3CBAB9")["Quota"]["Value"] == 5.0
    )
    # Anything else is still moto's: a vpc quota it knows, an ec2 quota it does not.
    vpc = quotas.get_service_quota(ServiceCode="vpc", QuotaCode="L-F678F1CE")["Quota"]
    assert vpc["ServiceCode"] == "vpc"
    with pytest.raises(ClientError) as raised:
        quotas.get_service_quota(ServiceCode="ec2", QuotaCode="L-1216C47A")
    assert raised.value.response["Error"]["Code"] == "NoSuchResourceException"
