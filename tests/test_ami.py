"""fedimg.ami: AMI names and RegisterImage parameters, and the EC2 edge on moto."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from botocore.awsrequest import AWSResponse
from botocore.exceptions import ClientError
from hypothesis import given
from hypothesis import strategies as st
from moto import mock_aws
from moto.core import DEFAULT_ACCOUNT_ID
from moto.core.botocore_stubber import MockRawResponse
from moto.ec2.models import ec2_backends

from fedimg import ami, tags
from fedimg.aws import AwsClients
from fedimg.compose import CloudImage
from fedimg.messages import StagedImage

REGION = "us-east-1"
AWS_NAME_RE = re.compile(r"^[A-Za-z0-9()\[\]./'@_ -]{3,128}$")
SHA = "ab" * 32


def make_image(name: str = "Fedora-Cloud-Base-40-1.4.x86_64.raw.xz", **kw: Any) -> CloudImage:
    fields: dict[str, Any] = {
        "compose_id": "Fedora-40-20240501.0",
        "variant": "Cloud",
        "arch": "x86_64",
        "subvariant": "Cloud_Base",
        "format": "raw.xz",
        "path": f"Cloud/x86_64/images/{name}",
        "url": f"http://127.0.0.1:1/compose/Cloud/x86_64/images/{name}",
        "size": 1000,
        "sha256": SHA,
        "image_name": name,
        "type": "raw-xz",
        "release": "40",
    }
    fields.update(kw)
    return CloudImage(**fields)


# -- fault injection at the botocore seam (also used by test_stage.py) ---------------


def client_error(code: str, operation: str) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": f"injected {code}"}}, operation)


def fail_calls(
    client: Any,
    operation: str,
    code: str,
    when: Callable[[dict[str, Any]], bool] = lambda params: True,
) -> list[dict[str, Any]]:
    """Make ``operation`` raise ClientError ``code`` for calls whose params match ``when``.

    Raised before the request is sent, so botocore does not retry it: right
    for the errors AWS does not retry either (AccessDenied, validation).
    Returns the list of params of every call seen.
    """
    seen: list[dict[str, Any]] = []
    service = client.meta.service_model.service_id.hyphenize()

    def hook(params: dict[str, Any], **_: Any) -> None:
        seen.append(dict(params))
        if when(params):
            raise client_error(code, operation)

    client.meta.events.register(f"provide-client-params.{service}.{operation}", hook)
    return seen


def throttle(client: Any, operation: str, times: int) -> list[int]:
    """Answer the first ``times`` HTTP sends of ``operation`` with EC2 throttling (503).

    Injected at ``before-send``, inside botocore's retry loop, so the
    client's retry policy sees real throttling responses. Returns a counter.
    """
    count = [0]
    body = (
        '<?xml version="1.0" encoding="UTF-8"?><Response><Errors><Error>'
        "<Code>RequestLimitExceeded</Code><Message>Request limit exceeded.</Message>"
        "</Error></Errors><RequestID>injected</RequestID></Response>"
    )

    def hook(request: Any, **_: Any) -> AWSResponse | None:
        if count[0] >= times:
            return None
        count[0] += 1
        # botocore still calls every before-send handler, moto's too: point this
        # attempt where moto does not answer, so it does not carry out the call.
        url, request.url = request.url, "http://throttled.invalid/"
        return AWSResponse(url, 503, {}, MockRawResponse(body))

    service = client.meta.service_model.service_id.hyphenize()
    client.meta.events.register_first(f"before-send.{service}.{operation}", hook)
    return count


def capture(client: Any, operation: str) -> list[dict[str, Any]]:
    """Every params dict the code SENT for ``operation`` (moto drops most of them)."""
    sent: list[dict[str, Any]] = []
    service = client.meta.service_model.service_id.hyphenize()

    def hook(params: dict[str, Any], **_: Any) -> None:
        sent.append(dict(params))

    client.meta.events.register(f"provide-client-params.{service}.{operation}", hook)
    return sent


# -- pure ---------------------------------------------------------------------------


def test_ami_name_is_deterministic_and_follows_aws_rules() -> None:
    image = make_image()
    name = ami.ami_name(image, "gp3")
    assert name == ami.ami_name(make_image(), "gp3")
    assert name == "Fedora-Cloud-Base-40-1.4.x86_64-hvm-gp3-" + SHA[:16]
    assert AWS_NAME_RE.match(name)


def test_ami_name_differs_by_volume_type_and_content() -> None:
    image = make_image()
    names = {
        ami.ami_name(image, "gp3"),
        ami.ami_name(image, "gp2"),
        ami.ami_name(make_image(sha256="cd" * 32), "gp3"),
        ami.ami_name(make_image("Fedora-Cloud-Base-40-1.5.x86_64.raw.xz"), "gp3"),
    }
    assert len(names) == 4


@given(
    name=st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,254}", fullmatch=True),
    sha=st.from_regex(r"[0-9a-f]{64}", fullmatch=True),
    vol=st.sampled_from(["gp2", "gp3", "io1", "io2", "standard"]),
)
def test_ami_name_is_always_valid_for_aws(name: str, sha: str, vol: str) -> None:
    result = ami.ami_name(make_image(name, sha256=sha), vol)
    assert AWS_NAME_RE.match(result), result
    assert result.endswith(f"-{vol}-{sha[:16]}")


@pytest.mark.parametrize(
    ("sha", "vol"),
    [("", "gp3"), ("AB" * 32, "gp3"), ("ab" * 31, "gp3"), (SHA, ""), (SHA, "gp3; rm")],
)
def test_ami_name_refuses_bad_input(sha: str, vol: str) -> None:
    with pytest.raises(ValueError):
        ami.ami_name(make_image(sha256=sha), vol)


@pytest.mark.parametrize(
    ("arch", "aws_arch", "boot_mode"),
    [("x86_64", "x86_64", "uefi-preferred"), ("aarch64", "arm64", "uefi")],
)
def test_register_params(arch: str, aws_arch: str, boot_mode: str) -> None:
    image = make_image(f"Fedora-Cloud-Base-40-1.4.{arch}.raw.xz", arch=arch)
    tag_list = [{"Key": "fedimg:state", "Value": "testing"}]
    params = ami.register_params(
        image, "snap-0123", "gp3", 5, description="a description", tags=tag_list
    )
    assert params == {
        "Name": ami.ami_name(image, "gp3"),
        "Description": "a description",
        "Architecture": aws_arch,
        "VirtualizationType": "hvm",
        "EnaSupport": True,
        "SriovNetSupport": "simple",
        "RootDeviceName": "/dev/sda1",
        "BootMode": boot_mode,
        "ImdsSupport": "v2.0",
        **({"TpmSupport": "v2.0"} if boot_mode == "uefi" else {}),
        "BlockDeviceMappings": [
            {
                "DeviceName": "/dev/sda1",
                "Ebs": {
                    "SnapshotId": "snap-0123",
                    "VolumeType": "gp3",
                    "VolumeSize": 5,
                    "DeleteOnTermination": True,
                },
            }
        ],
        "TagSpecifications": [{"ResourceType": "image", "Tags": tag_list}],
    }


@pytest.mark.parametrize(
    ("arch", "tpm"),
    [
        # uefi: the instance always boots UEFI, so NitroTPM is there.
        ("aarch64", "v2.0"),
        # uefi-preferred: legacy BIOS on instance types without UEFI, hence no TPM.
        ("x86_64", None),
    ],
)
def test_imdsv2_on_every_ami_and_nitrotpm_only_where_the_boot_mode_is_uefi(
    arch: str, tpm: str | None
) -> None:
    params = ami.register_params(make_image(arch=arch), "snap-1", "gp3", 2, description="", tags=[])
    assert params["ImdsSupport"] == "v2.0"
    assert params.get("TpmSupport") == tpm
    assert (params["BootMode"] in ami.TPM_BOOT_MODES) == (tpm is not None)


def test_register_params_provisioned_iops_within_aws_ratios() -> None:
    params = ami.register_params(make_image(), "snap-1", "io1", 2, description="d", tags=[])
    assert params["BlockDeviceMappings"][0]["Ebs"]["Iops"] == 100
    params = ami.register_params(make_image(), "snap-1", "io2", 100, description="d", tags=[])
    assert params["BlockDeviceMappings"][0]["Ebs"]["Iops"] == 3000


@pytest.mark.parametrize(
    ("vol", "size", "arch"),
    [("st1", 5, "x86_64"), ("sc1", 5, "x86_64"), ("gp3", 0, "x86_64"), ("gp3", 5, "ppc64le")],
)
def test_register_params_refuses_unbootable_setups(vol: str, size: int, arch: str) -> None:
    with pytest.raises(ValueError):
        ami.register_params(make_image(arch=arch), "snap-1", vol, size, description="", tags=[])


def test_description_names_compose_and_arch_within_limit() -> None:
    text = ami.ami_description(make_image("F" * 250 + ".raw.xz"), "gp3")
    assert "Fedora-40-20240501.0" in text and "x86_64" in text
    assert len(text) <= 255


# -- the EC2 edge on moto ---------------------------------------------------------------


@pytest.fixture
def ec2(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    monkeypatch.setenv("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")  # a second per test otherwise
    with mock_aws():
        yield AwsClients(max_attempts=3).ec2(REGION)


def new_snapshot(ec2: Any, sha: str = SHA, state_tag: bool = True) -> str:
    vol = ec2.create_volume(Size=1, AvailabilityZone=f"{REGION}a")
    snap = ec2.create_snapshot(VolumeId=vol["VolumeId"])["SnapshotId"]
    if state_tag:
        ec2.create_tags(Resources=[snap], Tags=[{"Key": tags.SHA256, "Value": sha}])
    return str(snap)


def image_tags_for(image: CloudImage, vol: str = "gp3") -> dict[str, str]:
    staged = StagedImage(
        compose_id=image.compose_id,
        image_name=image.image_name,
        image_url=image.url,
        architecture=image.arch,
        region=REGION,
        vol_type=vol,
        subvariant=image.subvariant,
        release=image.release,
        sha256=image.sha256,
    )
    return tags.image_tags(staged, tags.State.TESTING, "2024-05-01T00:00:00Z")


def params_for(image: CloudImage, snap: str, vol: str = "gp3") -> dict[str, Any]:
    return ami.register_params(
        image,
        snap,
        vol,
        1,
        description=ami.ami_description(image, vol),
        tags=tags.as_list(image_tags_for(image, vol)),
    )


def test_register_sends_params_and_tags_ami_and_snapshot(ec2: Any) -> None:
    image = make_image()
    snap = new_snapshot(ec2)
    sent = capture(ec2, "RegisterImage")
    params = params_for(image, snap)
    ami_id = ami.register(ec2, params)
    assert sent == [params]
    described = ec2.describe_images(ImageIds=[ami_id])["Images"][0]
    assert tags.as_dict(described["Tags"]) == image_tags_for(image)
    snap_tags = tags.as_dict(ec2.describe_snapshots(SnapshotIds=[snap])["Snapshots"][0]["Tags"])
    assert snap_tags == {k: v for k, v in image_tags_for(image).items() if k != tags.VOL_TYPE}


def test_register_deregisters_when_tagging_fails(ec2: Any) -> None:
    image = make_image()
    snap = new_snapshot(ec2)
    fail_calls(ec2, "CreateTags", "UnauthorizedOperation")
    with pytest.raises(ClientError):
        ami.register(ec2, params_for(image, snap))
    assert ami.find_ami(ec2, ami.ami_name(image, "gp3")) is None
    assert ec2.describe_images(Owners=["self"])["Images"] == []


def test_register_refused_leaves_nothing(ec2: Any) -> None:
    image = make_image()
    snap = new_snapshot(ec2)
    fail_calls(ec2, "RegisterImage", "AuthFailure")
    with pytest.raises(ClientError) as err:
        ami.register(ec2, params_for(image, snap))
    assert err.value.response["Error"]["Code"] == "AuthFailure"
    assert ec2.describe_images(Owners=["self"])["Images"] == []


def test_register_duplicate_name_returns_the_existing_ami(ec2: Any) -> None:
    image = make_image()
    snap = new_snapshot(ec2)
    first = ami.register(ec2, params_for(image, snap))
    # AWS refuses a second AMI of the same name (moto does not): simulate it.
    fail_calls(ec2, "RegisterImage", "InvalidAMIName.Duplicate")
    assert ami.register(ec2, params_for(image, snap)) == first


def test_register_retries_throttling(ec2: Any) -> None:
    image = make_image()
    snap = new_snapshot(ec2)
    count = throttle(ec2, "RegisterImage", 1)
    ami_id = ami.register(ec2, params_for(image, snap))
    assert count[0] == 1
    assert [i["ImageId"] for i in ec2.describe_images(Owners=["self"])["Images"]] == [ami_id]


def test_find_ami_by_name_then_by_tags(ec2: Any) -> None:
    image = make_image()
    assert ami.find_ami(ec2, ami.ami_name(image, "gp3"), SHA, "gp3") is None
    snap = new_snapshot(ec2)
    ami_id = ami.register(ec2, params_for(image, snap))
    assert ami.find_ami(ec2, ami.ami_name(image, "gp3"))["ImageId"] == ami_id  # type: ignore[index]
    # The same file renamed (a respin): found by its sha256 and volume type tags.
    found = ami.find_ami(ec2, "some-other-name", SHA, "gp3")
    assert found is not None and found["ImageId"] == ami_id
    assert ami.find_ami(ec2, "some-other-name", SHA, "gp2") is None
    assert ami.find_ami(ec2, "some-other-name", "cd" * 32, "gp3") is None
    assert ami.find_ami(ec2, "some-other-name") is None


def test_find_snapshot_only_completed_and_tagged(ec2: Any) -> None:
    assert ami.find_snapshot(ec2, SHA) is None
    new_snapshot(ec2, sha="cd" * 32)
    new_snapshot(ec2, state_tag=False)
    assert ami.find_snapshot(ec2, SHA) is None
    snap = new_snapshot(ec2)
    found = ami.find_snapshot(ec2, SHA)
    assert found is not None and found["SnapshotId"] == snap
    ec2_backends[DEFAULT_ACCOUNT_ID][REGION].snapshots[snap].status = "pending"
    assert ami.find_snapshot(ec2, SHA) is None


def test_wait_available(ec2: Any) -> None:
    image = make_image()
    ami_id = ami.register(ec2, params_for(image, new_snapshot(ec2)))
    assert ami.wait_available(ec2, ami_id, timeout=5, interval=0.05)["State"] == "available"


def test_wait_available_times_out_with_typed_error(ec2: Any) -> None:
    ami_id = ami.register(ec2, params_for(make_image(), new_snapshot(ec2)))
    ec2_backends[DEFAULT_ACCOUNT_ID][REGION].amis[ami_id].state = "pending"
    with pytest.raises(ami.AmiTimeout):
        ami.wait_available(ec2, ami_id, timeout=0.3, interval=0.05)


def test_wait_available_fails_on_failed_state(ec2: Any) -> None:
    ami_id = ami.register(ec2, params_for(make_image(), new_snapshot(ec2)))
    ec2_backends[DEFAULT_ACCOUNT_ID][REGION].amis[ami_id].state = "failed"
    with pytest.raises(ami.AmiError) as err:
        ami.wait_available(ec2, ami_id, timeout=5, interval=0.05)
    assert not isinstance(err.value, ami.AmiTimeout)


def test_wait_available_unknown_ami_times_out(ec2: Any) -> None:
    with pytest.raises(ami.AmiTimeout):
        ami.wait_available(ec2, "ami-0123456789abcdef0", timeout=0.3, interval=0.05)


def test_ensure_tags_adds_only_missing_keys(ec2: Any) -> None:
    snap = new_snapshot(ec2)
    ami.ensure_tags(
        ec2,
        snap,
        {tags.SHA256: "other", tags.STATE: "testing"},
        [{"Key": tags.SHA256, "Value": SHA}],
    )
    got = tags.as_dict(ec2.describe_snapshots(SnapshotIds=[snap])["Snapshots"][0]["Tags"])
    assert got == {tags.SHA256: SHA, tags.STATE: "testing"}
