"""fedimg.compose against a generated compose served over loopback HTTP (devel.compose)."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import productmd.images
import pytest
import requests
from hypothesis import given
from hypothesis import strategies as st

from devel.compose import ComposeServer, ComposeTree, build_compose, compose_message
from fedimg.compose import (
    ComposeError,
    bound_images,
    check_header_version,
    image_url,
    read_compose,
)
from fedimg.config import FedimgConfig
from fedimg.http import make_session
from fedimg.messages import InvalidMessage, parse_compose_status
from tests.corpus import (
    FUTURE_HEADER_VERSION,
    HUGE_COMPOSE_ENTRIES,
    future_metadata,
    huge_images_json,
    junk_name,
)

BASE = "http://127.0.0.1:8000/compose"


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> ComposeTree:
    return build_compose(tmp_path_factory.mktemp("compose"))


@pytest.fixture
def server(tree: ComposeTree) -> Iterator[ComposeServer]:
    with ComposeServer(tree.root, stall_seconds=10) as srv:
        yield srv


@pytest.fixture
def session() -> requests.Session:
    return make_session(retries=0, timeout=2.0)


def config(**kw: Any) -> FedimgConfig:
    return dataclasses.replace(FedimgConfig(resultsdb_url="http://127.0.0.1:9/api/v2.0"), **kw)


# -- image paths --------------------------------------------------------------------


def test_image_url_of_a_plain_path() -> None:
    assert image_url(BASE + "/", "Cloud/x86_64/images/F.raw.xz") == (
        BASE + "/Cloud/x86_64/images/F.raw.xz"
    )


@pytest.mark.parametrize(
    "path",
    [
        "",
        "/etc/passwd",
        "../compose2/x.raw.xz",
        "Cloud/../../etc/passwd",
        "Cloud//x.raw.xz",
        "./x.raw.xz",
        "Cloud/./x.raw.xz",
        "http://evil.example/x.raw.xz",
        "//evil.example/x.raw.xz",
        "Cloud\\..\\x.raw.xz",
        "%2e%2e/x.raw.xz",
        "Cloud/x.raw.xz?y=1",
        "Cloud/x.raw.xz#frag",
        "Cloud/x .raw.xz",
        "Cloud/x\n.raw.xz",
    ],
)
def test_image_url_refuses_paths_leaving_the_compose(path: str) -> None:
    with pytest.raises(ComposeError):
        image_url(BASE, path)


@given(st.text(max_size=60))
def test_image_url_never_leaves_the_compose(path: str) -> None:
    try:
        url = image_url(BASE, path)
    except ComposeError:
        return
    assert url.startswith(BASE + "/")
    assert ".." not in url.split("/") and "//" not in url[len("http://") :]


# -- reading a good compose -------------------------------------------------------------


def test_reads_the_cloud_raw_xz_images(
    tree: ComposeTree, server: ComposeServer, session: requests.Session
) -> None:
    found = read_compose(session, server.url, config(), tree.compose_id)
    assert found.compose_id == tree.compose_id
    assert found.release_version == "40"
    assert found.rejected == []
    expected = {b.image_name: b for b in tree.raw_images()}
    assert {i.image_name for i in found.images} == set(expected)  # the qcow2 is not there
    for image in found.images:
        built = expected[image.image_name]
        assert image.url == server.url_of(built.path)
        assert image.sha256 == built.sha256
        assert image.size == built.size
        assert image.format == "raw.xz"
        assert image.arch == built.spec.arch
        assert image.variant == built.spec.variant
        assert image.subvariant == built.spec.subvariant
        assert image.compose_id == tree.compose_id
        assert image.release == "40"


@pytest.mark.parametrize(
    "case",
    [
        (["aarch64"], ["Cloud", "AtomicHost"], {"Fedora-Cloud-Base-40-20240501.0.aarch64.raw.xz"}),
        (["x86_64"], ["AtomicHost"], {"Fedora-AtomicHost-40-20240501.0.x86_64.raw.xz"}),
        (["x86_64", "aarch64"], ["CloudImages"], set()),
    ],
)
def test_selection_follows_config(
    server: ComposeServer,
    session: requests.Session,
    case: tuple[list[str], list[str], set[str]],
) -> None:
    arches, variants, names = case
    found = read_compose(session, server.url, config(arches=arches, variants=variants))
    assert {i.image_name for i in found.images} == names


def test_release_from_the_message_when_composeinfo_is_absent(
    tree: ComposeTree, server: ComposeServer, session: requests.Session
) -> None:
    server.missing("metadata/composeinfo.json")
    found = read_compose(session, server.url, config(), release_version="Rawhide")
    assert found.release_version == "Rawhide"
    assert {i.release for i in found.images} == {"Rawhide"}


def test_unusable_composeinfo_is_ignored_with_a_warning(
    tree: ComposeTree,
    server: ComposeServer,
    session: requests.Session,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server.replace("metadata/composeinfo.json", b'{"header": 1}')
    found = read_compose(session, server.url, config(), release_version="40")
    assert found.release_version == "40" and len(found.images) == 3
    assert any(r.levelno == logging.WARNING for r in caplog.records)


# -- a bad compose ----------------------------------------------------------------------


def not_productmd_bodies(tree: ComposeTree) -> list[bytes]:
    return [
        b"{}",
        b'{"header": {"type": "productmd.images", "version": "1.2"}}',
        b'{"header": {"type": "productmd.images", "version": "1.2"}, "payload": []}',
        b"[1, 2, 3]",
        b'"images"',
        tree.composeinfo_json.read_bytes(),  # productmd, but the wrong kind
        json.dumps(
            {
                "header": {"type": "productmd.images", "version": "1.2"},
                "payload": {"compose": {"id": "x"}, "images": {}},
            }
        ).encode(),
    ]


@pytest.mark.parametrize("case", range(7))
def test_not_productmd_metadata_is_refused(
    tree: ComposeTree, server: ComposeServer, session: requests.Session, case: int
) -> None:
    server.replace("metadata/images.json", not_productmd_bodies(tree)[case])
    with pytest.raises(ComposeError):
        read_compose(session, server.url, config())


@pytest.mark.parametrize(
    ("fault", "arg"),
    [
        ("missing", None),
        ("html", None),
        ("replace", b"{not json"),
        ("replace", b"\xff\xfe\x00garbage"),
        ("replace", b"<html><body>Service Unavailable</body></html>"),
        ("stall", None),
    ],
)
def test_missing_html_invalid_or_stalled_metadata_is_refused(
    server: ComposeServer, fault: str, arg: bytes | None
) -> None:
    rel = "metadata/images.json"
    if arg is None:
        getattr(server, fault)(rel)
    else:
        server.replace(rel, arg)
    with pytest.raises(ComposeError):
        read_compose(make_session(retries=0, timeout=0.5), server.url, config())


def test_other_compose_than_announced_is_refused(
    server: ComposeServer, session: requests.Session
) -> None:
    with pytest.raises(ComposeError):
        read_compose(session, server.url, config(), "Fedora-41-20240601.0")


@pytest.mark.parametrize(
    ("location", "allowed"),
    [
        ("ftp://127.0.0.1/compose", []),
        ("file:///srv/compose", []),
        ("http://user:pw@127.0.0.1/compose", []),
        ("http:///compose", []),
        ("http://127.0.0.1:1/compose", ["kojipkgs.fedoraproject.org"]),
    ],
)
def test_location_refused(session: requests.Session, location: str, allowed: list[str]) -> None:
    with pytest.raises(ComposeError):
        read_compose(session, location, config(allowed_hosts=allowed))


def test_allowed_host_is_accepted(server: ComposeServer, session: requests.Session) -> None:
    found = read_compose(session, server.url, config(allowed_hosts=["127.0.0.1"]))
    assert len(found.images) == 3


def test_unsafe_image_entries_are_set_aside_not_the_compose(
    tree: ComposeTree,
    server: ComposeServer,
    session: requests.Session,
    caplog: pytest.LogCaptureFixture,
) -> None:
    images = tree.load_images()
    bad = {}
    for variant in images.images.values():
        for entries in variant.values():
            for entry in entries:
                if entry.arch == "aarch64" and entry.format == "raw.xz":
                    entry.path = "../../../etc/passwd.raw.xz"
                    bad["path"] = entry.path
                if entry.subvariant == "AtomicHost":
                    entry.checksums = {"md5": "0" * 32}
    text = json.dumps(images.serialize({}))
    server.replace("metadata/images.json", text.encode())
    found = read_compose(session, server.url, config())
    assert [i.image_name for i in found.images] == ["Fedora-Cloud-Base-40-20240501.0.x86_64.raw.xz"]
    assert {r.path for r in found.rejected} == {
        bad["path"],
        "AtomicHost/x86_64/images/Fedora-AtomicHost-40-20240501.0.x86_64.raw.xz",
    }
    assert sum(r.levelno == logging.ERROR for r in caplog.records) == 2


# -- the test server and message --------------------------------------------------------


def test_server_supports_ranges(tree: ComposeTree, server: ComposeServer) -> None:
    built = tree.raw_images()[0]
    data = built.file.read_bytes()
    url = server.url_of(built.path)
    tail = requests.get(url, headers={"Range": "bytes=-100"}, timeout=5)
    assert tail.status_code == 206 and tail.content == data[-100:]
    assert tail.headers["Content-Range"] == f"bytes {len(data) - 100}-{len(data) - 1}/{len(data)}"
    middle = requests.get(url, headers={"Range": "bytes=10-19"}, timeout=5)
    assert middle.status_code == 206 and middle.content == data[10:20]
    whole = requests.get(url, timeout=5)
    assert whole.status_code == 200 and whole.content == data
    bad = requests.get(url, headers={"Range": f"bytes={len(data)}-"}, timeout=5)
    assert bad.status_code == 416
    assert requests.get(server.base_url + "/etc/passwd", timeout=5).status_code == 404
    assert server.hits_of(built.path) == 4


def test_compose_message_is_a_valid_finished_status(
    tree: ComposeTree, server: ComposeServer
) -> None:
    status = parse_compose_status(compose_message(tree, server.url))
    assert status.finished and status.location == server.url
    assert status.compose_id == tree.compose_id and status.release_version == "40"


@pytest.mark.parametrize(
    "change",
    [
        {"compose_id": None},
        {"compose_id": 42},
        {"status": ["FINISHED"]},
        {"location": "ftp://kojipkgs.fedoraproject.org/compose"},
        {"location": "/mnt/koji/compose"},
        {"location": None},
        {"compose_respin": "0"},
    ],
)
def test_malformed_compose_messages_are_refused(
    tree: ComposeTree, change: dict[str, object]
) -> None:
    body = compose_message(tree, BASE)
    for key, value in change.items():
        if value is None:
            del body[key]
        else:
            body[key] = value
    with pytest.raises(InvalidMessage):
        parse_compose_status(body)


def test_builds_what_it_says(tree: ComposeTree) -> None:
    for built in tree.raw_images():
        assert built.facts is not None
        assert built.facts.nonzero_blocks == built.spec.data_blocks
        assert built.facts.raw_size == built.spec.raw_mib * 1024 * 1024
    assert Path(tree.images_json).is_file() and Path(tree.composeinfo_json).is_file()


# -- metadata from the future, and composes listing thousands of images -------------------


@pytest.mark.parametrize("name", ["metadata/images.json", "metadata/composeinfo.json"])
def test_a_metadata_header_version_productmd_cannot_read_is_refused(
    tree: ComposeTree,
    server: ComposeServer,
    session: requests.Session,
    name: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server.replace(name, future_metadata((tree.compose_dir / name).read_text()))
    if name.endswith("images.json"):
        with pytest.raises(ComposeError) as info:
            read_compose(session, server.url, config(), tree.compose_id)
        assert FUTURE_HEADER_VERSION in str(info.value)
        return
    # composeinfo.json only gives the release: it is ignored, with a warning.
    with caplog.at_level(logging.WARNING, logger="fedimg.compose"):
        found = read_compose(session, server.url, config(), tree.compose_id, "40-announced")
    assert found.release_version == "40-announced"
    assert len(found.images) == 3
    assert [r.levelno for r in caplog.records if r.name == "fedimg.compose"].count(
        logging.WARNING
    ) == 1


@pytest.mark.parametrize("version", ["1.0", "1.1", "1.2", "1.99"])
def test_header_versions_of_the_supported_major_are_read(
    tree: ComposeTree, server: ComposeServer, session: requests.Session, version: str
) -> None:
    server.replace("metadata/images.json", future_metadata(tree.images_json.read_text(), version))
    found = read_compose(session, server.url, config(), tree.compose_id)
    assert len(found.images) == 3


def test_check_header_version_leaves_other_shapes_to_productmd() -> None:
    data: Any
    for data in ({}, [], {"header": []}, {"header": {"version": 2}}, {"header": {"version": "x"}}):
        check_header_version(data, "x.json")
    with pytest.raises(ComposeError):
        check_header_version({"header": {"version": "2.0"}}, "x.json")


def test_a_huge_compose_is_bounded_before_productmd_reads_it(
    tree: ComposeTree,
    server: ComposeServer,
    session: requests.Session,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """5,000 made-up entries: productmd (quadratic in images) sees only the first 20."""
    server.replace("metadata/images.json", huge_images_json(tree.images_json.read_text()))
    added: list[str] = []
    real_add = productmd.images.Images.add

    def spy(self: Any, variant: str, arch: str, image: Any) -> None:
        added.append(str(image.path))
        real_add(self, variant, arch, image)

    monkeypatch.setattr(productmd.images.Images, "add", spy)
    with caplog.at_level(logging.INFO, logger="fedimg.compose"):
        found = read_compose(session, server.url, config(max_images=20), tree.compose_id)
    assert len(added) == 20
    names = [i.image_name for i in found.images]
    assert {b.image_name for b in tree.raw_images()} <= set(names), "the compose's own first"
    assert names[3:] == [junk_name(n) for n in range(17)]
    (summary,) = found.rejected
    assert str(HUGE_COMPOSE_ENTRIES - 17) in summary.reason
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, "said once"


def test_bound_images_keeps_the_order_select_images_uses() -> None:
    def entry(path: str, fmt: str = "raw.xz") -> dict[str, Any]:
        return {"path": path, "format": fmt}

    data: dict[str, Any] = {
        "header": {"version": "1.2"},
        "payload": {
            "compose": {"id": "x"},
            "images": {
                "Server": {"x86_64": [entry("s/a.raw.xz")]},
                "Cloud": {
                    "x86_64": [
                        entry("c/x/b.raw.xz"),
                        entry("c/x/a.qcow2", "qcow2"),
                        entry("c/x/a.raw.xz"),
                    ],
                    "aarch64": [entry("c/a/z.raw.xz")],
                    "ppc64le": [entry("c/p/a.raw.xz")],
                },
                "AtomicHost": {"x86_64": [entry("c/x/a.raw.xz")]},  # the same file again
            },
        },
    }
    kept, skipped = bound_images(
        data, variants=["Cloud", "AtomicHost"], arches=["x86_64", "aarch64"], max_images=2
    )
    assert kept["payload"]["images"] == {
        "AtomicHost": {"x86_64": [entry("c/x/a.raw.xz")]},
        "Cloud": {"aarch64": [entry("c/a/z.raw.xz")], "x86_64": [entry("c/x/a.raw.xz")]},
    }
    assert skipped == 1  # c/x/b.raw.xz
    assert kept["payload"]["compose"] == {"id": "x"} and kept["header"] == data["header"]
    assert len(data["payload"]["images"]["Cloud"]["x86_64"]) == 3, "the input is not changed"


@pytest.mark.parametrize(
    "images",
    [
        {"Cloud": []},
        {"Cloud": {"x86_64": {"a": 1}}},
        {"Cloud": {"x86_64": ["not an image"]}},
        {"Cloud": {"x86_64": [{"format": "raw.xz"}]}},
        {"Cloud": {"x86_64": [{"path": 7}]}},
    ],
)
def test_bound_images_refuses_wanted_parts_that_are_not_images(images: dict[str, Any]) -> None:
    data = {"payload": {"images": images}}
    with pytest.raises(ComposeError):
        bound_images(data, variants=["Cloud"], arches=["x86_64"], max_images=5)


def test_bound_images_leaves_unwanted_and_unshaped_metadata_alone() -> None:
    kept, skipped = bound_images(
        {"payload": {"images": {"Server": ["junk"]}}},
        variants=["Cloud"],
        arches=["x86_64"],
        max_images=5,
    )
    assert (kept, skipped) == ({"payload": {"images": {}}}, 0)
    shapeless: Any
    for shapeless in ([], {"payload": []}, {"payload": {"images": []}}):
        assert bound_images(shapeless, variants=["Cloud"], arches=["x86_64"], max_images=1) == (
            shapeless,
            0,
        )
