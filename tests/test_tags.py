"""AWS's limits on tags (keys 128, values 256, 50 a resource) on every tag fedimg writes.

``fedimg.aws.tag_list`` / ``tag_specs`` are the one way tags are written. The
end-to-end cases stage a valid image whose 253-character name makes its URL
longer than a tag value may be, copy it to another region and launch a test
instance, all on moto in process, and check what was SENT (a botocore hook
on the session every client comes from) as well as what moto kept. The full
URL stays in the messages.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
from hypothesis import given
from hypothesis import strategies as st
from moto import mock_aws

import autocloud_ami.instance
from autocloud_ami.instance import TestInstance
from devel.compose import ComposeServer, ComposeTree, ImageSpec, build_compose
from fedimg import tags
from fedimg.aws import AwsClients, tag_list, tag_specs
from fedimg.config import FedimgConfig
from fedimg.copies import Copier
from fedimg.http import make_session
from fedimg.messages import Emitter, parse_test_request
from tests.corpus import LONG_NAME_LENGTH, long_image_name
from tests.engine_support import make_engine
from tests.test_instance import FAST, make_spec

REGION = "us-east-1"
COPY_REGION = "us-west-2"
LONG = long_image_name()


# -- the helper --------------------------------------------------------------------------


def test_values_are_cut_to_256_characters_and_keys_kept() -> None:
    listed = tags.as_list({"fedimg:image-url": "u" * 321, "fedimg:arch": "x86_64", "k": "v" * 256})
    assert listed == [
        {"Key": "fedimg:image-url", "Value": "u" * 256},
        {"Key": "fedimg:arch", "Value": "x86_64"},
        {"Key": "k", "Value": "v" * 256},
    ]


@pytest.mark.parametrize(
    "bad",
    [{"k" * 129: "v"}, {"": "v"}, {"aws:created-by": "v"}, {f"k{n}": "v" for n in range(51)}],
    ids=["key of 129", "empty key", "aws: prefix", "51 tags"],
)
def test_what_aws_would_refuse_is_a_bug_raised_before_any_call(bad: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        tags.as_list(bad)
    with pytest.raises(ValueError):
        tag_specs(("image",), bad)


def test_tag_specs_gives_each_resource_type_its_own_list() -> None:
    specs = tag_specs(("image", "snapshot"), {"a": "b" * 300})
    assert specs == [
        {"ResourceType": "image", "Tags": [{"Key": "a", "Value": "b" * 256}]},
        {"ResourceType": "snapshot", "Tags": [{"Key": "a", "Value": "b" * 256}]},
    ]
    assert specs[0]["Tags"][0] is not specs[1]["Tags"][0]


def test_every_writer_uses_the_same_helper() -> None:
    assert autocloud_ami.instance.tag_specs is tag_specs
    assert tags.as_list({"k": "v" * 300}) == tag_list({"k": "v" * 300})


@given(st.dictionaries(st.text(min_size=1, max_size=128), st.text(max_size=600), max_size=50))
def test_whatever_is_written_is_within_the_limits(values: dict[str, str]) -> None:
    try:
        listed = tags.as_list(values)
    except ValueError:
        assert any(k.lower().startswith("aws:") for k in values)
        return
    assert [t["Key"] for t in listed] == list(values)
    for t in listed:
        assert t["Value"] == values[t["Key"]][:256]


# -- every writer, end to end on moto -----------------------------------------------------------


@dataclass
class Sent:
    """Every tag list sent to AWS, by operation."""

    calls: list[tuple[str, list[dict[str, str]]]] = dataclasses.field(default_factory=list)

    def hook(self, params: dict[str, Any], model: Any, **_: Any) -> None:
        lists = []
        if "Tags" in params:
            lists.append(params["Tags"])
        lists += [spec.get("Tags", []) for spec in params.get("TagSpecifications", [])]
        for listed in lists:
            self.calls.append((model.name, list(listed)))

    def operations(self) -> set[str]:
        return {op for op, _ in self.calls}

    def values(self, key: str) -> list[str]:
        return [t["Value"] for _, listed in self.calls for t in listed if t["Key"] == key]

    def assert_within_limits(self) -> None:
        assert self.calls
        for op, listed in self.calls:
            assert len(listed) <= 50, op
            for t in listed:
                assert 1 <= len(t["Key"]) <= 128, (op, t["Key"])
                assert len(t["Value"]) <= 256, (op, t["Key"], len(t["Value"]))


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> ComposeTree:
    spec = ImageSpec("Cloud", "x86_64", "Cloud_Base", raw_mib=2, data_blocks=(0,), name=LONG)
    return build_compose(Path(tmp_path_factory.mktemp("long")), images=(spec,))


@pytest.fixture
def world(
    tree: ComposeTree, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[AwsClients, Sent, ComposeServer]]:
    monkeypatch.setenv("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")
    sent = Sent()
    session = boto3.session.Session()
    session.events.register("provide-client-params", sent.hook)
    with mock_aws(), ComposeServer(tree.root) as server:
        yield AwsClients(max_attempts=2, session=session), sent, server


def test_a_long_image_name_is_staged_copied_and_tested_within_aws_limits(
    tree: ComposeTree,
    world: tuple[AwsClients, Sent, ComposeServer],
    recorder: Any,
    tmp_path: Path,
) -> None:
    aws, sent, server = world
    assert len(LONG) == LONG_NAME_LENGTH
    url = server.url_of(tree.image(LONG).path)
    assert len(url) > 256
    cfg = FedimgConfig(
        resultsdb_url="http://127.0.0.1:9/api/v2.0", upload_workers=2, state_dir=str(tmp_path)
    )
    engine = make_engine(
        cfg,
        Emitter(recorder),
        aws,
        tmp_path,
        session=make_session(0, 5.0),
        available_timeout=10,
        poll_interval=0.05,
    )
    try:
        (outcome,) = engine.stage_location(server.url, tree.compose_id)
    finally:
        engine.close()
    assert outcome.status == "staged", outcome.reason
    # The full URL is in the messages, the tags carry as much of it as AWS allows.
    (request,) = recorder.bodies("fedimg.image.test")
    staged = parse_test_request(request)
    assert staged.image_url == url and staged.image_name == LONG
    assert set(sent.values(tags.IMAGE_URL)) == {url[:256]}
    assert set(sent.values(tags.IMAGE_NAME)) == {LONG}

    copier = Copier(aws, REGION)
    copy_ami = copier.start_copy(COPY_REGION, staged, "a-copy-name")
    assert copy_ami.startswith("ami-")

    ec2 = aws.ec2(REGION)
    with TestInstance(ec2, make_spec(str(staged.ami_id)), FAST) as inst:
        assert inst.instance_id

    assert {"StartSnapshot", "RegisterImage", "CopyImage", "CreateTags", "RunInstances"} <= (
        sent.operations()
    )
    assert {"ImportKeyPair", "CreateSecurityGroup"} <= sent.operations()
    sent.assert_within_limits()
    # What moto kept matches what was sent.
    for described in (
        ec2.describe_images(Owners=["self"])["Images"]
        + ec2.describe_snapshots(OwnerIds=["self"])["Snapshots"]
        + aws.ec2(COPY_REGION).describe_images(Owners=["self"])["Images"]
    ):
        for t in described.get("Tags", []):
            assert len(t["Value"]) <= 256
