"""What tests.botocache shares between botocore sessions, and what it must not."""

from __future__ import annotations

from typing import Any

import boto3
from moto import mock_aws


def _client(region: str = "us-east-1") -> Any:
    return boto3.session.Session().client(
        "ec2",
        region_name=region,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


def test_sessions_share_the_client_class_and_the_parsed_model() -> None:
    one, two = _client(), _client("eu-west-1")
    assert type(one) is type(two)
    assert one.meta.service_model is not None
    assert one._service_model._service_description is two._service_model._service_description
    assert one.meta.region_name == "us-east-1" and two.meta.region_name == "eu-west-1"


def test_a_hook_on_one_client_never_reaches_a_client_of_another_session() -> None:
    seen: list[str] = []
    with mock_aws():
        one, two = _client(), _client()
        one.meta.events.register(
            "before-call.ec2.DescribeImages", lambda **kwargs: seen.append("one")
        )
        one.describe_images(Owners=["self"])
        two.describe_images(Owners=["self"])
        third = _client()
        third.describe_images(Owners=["self"])
    assert seen == ["one"]


def test_a_class_attribute_set_on_one_client_is_set_on_its_instance_only() -> None:
    one, two = _client(), _client()
    one.describe_images = lambda **kwargs: "patched"  # what monkeypatching a client does
    assert one.describe_images() == "patched"
    assert two.describe_images != one.describe_images
    assert "describe_images" not in vars(two)
