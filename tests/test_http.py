"""The HTTP seam (fedimg.http) against real loopback servers: hosts, redirects, retries, resumes.

Two image servers run on different loopback addresses, 127.0.0.1 (allowed)
and 127.0.0.2 (not allowed unless a test says so); each logs every request
it gets. A redirect to a host outside ``allowed_hosts`` must fail before that
host is asked anything, for the size probe, the download and the compose
metadata alike. A download cut short is resumed from the last byte received,
a bounded number of times with the declared backoff; a 404 is never retried.
(The last byte received is the end of the last chunk the download handed on:
the tests cut at whole chunks to know where the resume must start.)
"""

from __future__ import annotations

import lzma
from collections.abc import Iterator

import pytest
import requests

from devel.images import BLOCK, ImageFacts, ImageServer, Route, build_raw_xz, forged_xz
from fedimg import download
from fedimg.compose import ComposeError, fetch_text
from fedimg.download import (
    DownloadError,
    ImageTooLarge,
    probe_raw_size,
    stream_raw,
)
from fedimg.http import (
    MAX_REDIRECTS,
    NO_RETRY,
    HostNotAllowed,
    RetryPolicy,
    make_session,
    retry_policy,
)
from tests.corpus import CLAIMED_RAW_SIZE, NOT_ALLOWED_HOST

pytestmark = pytest.mark.integration

ALLOWED = ("127.0.0.1",)
CHUNK = 64 * 1024


@pytest.fixture
def home() -> Iterator[ImageServer]:
    with ImageServer("127.0.0.1") as srv:
        yield srv


@pytest.fixture
def away() -> Iterator[ImageServer]:
    with ImageServer(NOT_ALLOWED_HOST) as srv:
        yield srv


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> ImageFacts:
    """Incompressible data in every block: a 2 MiB compressed file to cut short."""
    return build_raw_xz(tmp_path_factory.mktemp("http") / "img.raw.xz", 4 * BLOCK, range(4))


def session(allowed: tuple[str, ...] = ALLOWED, retries: int = 0) -> requests.Session:
    return make_session(retries=retries, timeout=5.0, backoff=0.0, allowed_hosts=allowed)


def consume(chunks: Iterator[bytes]) -> bytes:
    return b"".join(chunks)


# -- redirects: every hop is checked before it is requested ------------------------------


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirected_download_never_reaches_a_host_not_allowed(
    home: ImageServer, away: ImageServer, image: ImageFacts, status: int
) -> None:
    elsewhere = away.add("img.raw.xz", Route(image.path))
    url = home.add("img.raw.xz", Route(status=status, location=elsewhere))
    with pytest.raises(DownloadError) as probed:
        probe_raw_size(session(), url)
    with pytest.raises(DownloadError) as streamed:
        consume(stream_raw(session(), url, image.sha256, image.raw_size))
    assert away.requests == [], "the host outside allowed_hosts was contacted"
    assert [path for path, _ in home.requests] == ["/img.raw.xz", "/img.raw.xz"]
    for info in (probed, streamed):
        assert isinstance(info.value.__cause__, HostNotAllowed)
        assert NOT_ALLOWED_HOST in str(info.value)


def test_compose_metadata_redirected_away_is_refused_before_the_request(
    home: ImageServer, away: ImageServer
) -> None:
    elsewhere = away.add("compose/metadata/images.json", Route(b"{}"))
    url = home.add("compose/metadata/images.json", Route(status=302, location=elsewhere))
    with pytest.raises(ComposeError) as info:
        fetch_text(session(), url, ALLOWED)
    assert away.requests == []
    assert NOT_ALLOWED_HOST in str(info.value)


def test_a_chain_of_redirects_is_checked_hop_by_hop(
    home: ImageServer, away: ImageServer, image: ImageFacts
) -> None:
    """Allowed -> allowed (another path) -> not allowed: the last host is never asked."""
    final = away.add("img.raw.xz", Route(image.path))
    second = home.add("hop2.raw.xz", Route(status=307, location=final))
    first = home.add("hop1.raw.xz", Route(status=302, location="/hop2.raw.xz"))  # relative
    with pytest.raises(DownloadError):
        probe_raw_size(session(), first)
    assert second.endswith("/hop2.raw.xz")
    assert [path for path, _ in home.requests] == ["/hop1.raw.xz", "/hop2.raw.xz"]
    assert away.requests == []


def test_redirects_between_allowed_hosts_are_followed(
    home: ImageServer, away: ImageServer, image: ImageFacts
) -> None:
    """The same redirect with both hosts allowed: fetched from the other host, as asked."""
    elsewhere = away.add("img.raw.xz", Route(image.path))
    url = home.add("img.raw.xz", Route(status=302, location=elsewhere))
    both = session(("127.0.0.1", NOT_ALLOWED_HOST))
    assert probe_raw_size(both, url) == image.raw_size
    raw = consume(stream_raw(both, url, image.sha256, image.raw_size))
    assert raw == lzma.decompress(image.path.read_bytes())
    assert len(away.requests) >= 2


@pytest.mark.parametrize(
    "location",
    [
        "file:///etc/passwd",
        "ftp://127.0.0.1/img.raw.xz",
        "http://user:pw@127.0.0.1:1/img.raw.xz",
        "gopher://127.0.0.1/",
    ],
)
def test_redirects_to_other_schemes_or_credentials_are_refused(
    home: ImageServer, location: str
) -> None:
    """Even with no allowed_hosts (any http(s) host): nothing but plain http(s) is followed."""
    url = home.add("img.raw.xz", Route(status=302, location=location))
    with pytest.raises(DownloadError):
        probe_raw_size(session(()), url)
    assert len(home.requests) == 1


def test_redirect_loops_end_at_the_declared_bound(home: ImageServer) -> None:
    url = home.add("loop.raw.xz", Route(status=302, location="/loop.raw.xz"))
    with pytest.raises(DownloadError):
        probe_raw_size(session(), url)
    assert len(home.requests) == MAX_REDIRECTS + 1


def test_the_first_request_is_checked_too(away: ImageServer, image: ImageFacts) -> None:
    url = away.add("img.raw.xz", Route(image.path))
    with pytest.raises(DownloadError):
        probe_raw_size(session(), url)
    assert away.requests == []


# -- 404s are final; retries and resumes follow one declared policy ----------------------


def test_a_404_is_not_retried_however_many_retries_are_allowed(home: ImageServer) -> None:
    url = home.add("gone.raw.xz", Route(status=404))
    with pytest.raises(DownloadError, match="404"):
        probe_raw_size(session(retries=5), url)
    with pytest.raises(DownloadError, match="404"):
        consume(stream_raw(session(retries=5), url, "0" * 64, 1))
    assert len(home.requests) == 2


def test_a_503_is_retried_as_declared(home: ImageServer) -> None:
    url = home.add("busy.raw.xz", Route(status=503))
    with pytest.raises(DownloadError):
        probe_raw_size(session(retries=2), url)
    assert len(home.requests) == 3


def test_the_retry_policy_is_declared_once_on_the_session() -> None:
    policy = retry_policy(make_session(retries=3, timeout=1.0, backoff=0.5))
    assert policy == RetryPolicy(retries=3, backoff=0.5)
    assert [policy.delay(n) for n in (1, 2, 3)] == [0.5, 1.0, 2.0]
    assert RetryPolicy(retries=9, backoff=1.0, max_delay=4.0).delay(9) == 4.0
    assert retry_policy(requests.Session()) is NO_RETRY
    with pytest.raises(ValueError):
        RetryPolicy(retries=-1)


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The backoff delays the download waits (recorded, not slept)."""
    waited: list[float] = []
    monkeypatch.setattr(download, "_sleep", waited.append)
    return waited


def test_a_cut_download_resumes_from_the_last_byte_received(
    home: ImageServer, image: ImageFacts, sleeps: list[float]
) -> None:
    cut = 5 * CHUNK  # the last byte received is the end of the last chunk handed on
    url = home.add("img.raw.xz", Route(image.path, cut_after=cut, cuts=1))
    s = make_session(retries=3, timeout=5.0, backoff=0.25)
    raw = consume(stream_raw(s, url, image.sha256, image.raw_size, chunk_size=CHUNK))
    assert raw == lzma.decompress(image.path.read_bytes())
    assert home.requests == [("/img.raw.xz", None), ("/img.raw.xz", f"bytes={cut}-")]
    assert home.bytes_sent["/img.raw.xz"] == image.compressed_size, "no byte fetched twice"
    assert sleeps == [0.25]


def test_a_download_cut_on_every_answer_resumes_until_it_is_whole(
    home: ImageServer, image: ImageFacts, sleeps: list[float]
) -> None:
    """Each answer brings 1 MiB more: a 2 MiB file needs two resumes of three allowed."""
    mib = 1024 * 1024
    url = home.add("img.raw.xz", Route(image.path, cut_after=mib))
    s = make_session(retries=3, timeout=5.0, backoff=0.25)
    raw = consume(stream_raw(s, url, image.sha256, image.raw_size))
    assert len(raw) == image.raw_size
    ranges = [r for _, r in home.requests]
    assert ranges == [None, f"bytes={mib}-", f"bytes={2 * mib}-"][: len(ranges)]
    assert len(ranges) == -(-image.compressed_size // mib)
    assert sleeps == [0.25, 0.5][: len(ranges) - 1]


def test_resumes_are_bounded_then_the_download_fails(
    home: ImageServer, image: ImageFacts, sleeps: list[float]
) -> None:
    cut = 2 * CHUNK
    url = home.add("img.raw.xz", Route(image.path, cut_after=cut))
    s = make_session(retries=2, timeout=5.0, backoff=1.0)
    got: list[bytes] = []
    with pytest.raises(DownloadError) as info:
        for chunk in stream_raw(s, url, image.sha256, image.raw_size, chunk_size=CHUNK):
            got.append(chunk)
    assert type(info.value) is DownloadError, "a cut download is not a bad image"
    assert [r for _, r in home.requests] == [None, f"bytes={cut}-", f"bytes={2 * cut}-"]
    assert sleeps == [1.0, 2.0]
    assert sum(map(len, got)) < image.raw_size


def test_no_resume_without_retries(home: ImageServer, image: ImageFacts) -> None:
    url = home.add("img.raw.xz", Route(image.path, cut_after=CHUNK))
    with pytest.raises(DownloadError):
        consume(stream_raw(session(retries=0), url, image.sha256, image.raw_size, CHUNK))
    assert len(home.requests) == 1


def test_a_resume_answered_with_the_whole_file_is_refused(
    home: ImageServer, image: ImageFacts, sleeps: list[float]
) -> None:
    """A server that ignores Range on the resume: no byte is appended twice."""
    url = home.add("img.raw.xz", Route(image.path, ranges=False, cut_after=CHUNK, cuts=1))
    with pytest.raises(DownloadError) as info:
        consume(stream_raw(session(retries=3), url, image.sha256, image.raw_size, CHUNK))
    assert "206" in str(info.value)
    assert len(home.requests) == 2


def test_a_file_that_changes_size_between_answers_is_refused(
    home: ImageServer, image: ImageFacts, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = image.path.read_bytes()
    url = home.add("img.raw.xz", Route(data, cut_after=CHUNK, cuts=1))

    def replace_file(_: float) -> None:  # while the download waits to resume
        home.add("img.raw.xz", Route(data + bytes(4)))

    monkeypatch.setattr(download, "_sleep", replace_file)
    with pytest.raises(DownloadError, match="changed"):
        consume(stream_raw(session(retries=3), url, image.sha256, image.raw_size, CHUNK))
    assert len(home.requests) == 2


# -- the size cap: a forged index claiming 100 TiB ---------------------------------------------


def test_a_forged_index_is_believed_only_up_to_the_cap(home: ImageServer) -> None:
    url = home.add("huge.raw.xz", Route(forged_xz(CLAIMED_RAW_SIZE)))
    assert probe_raw_size(session(), url) == CLAIMED_RAW_SIZE  # what it claims
    with pytest.raises(ImageTooLarge) as info:
        probe_raw_size(session(), url, max_raw_gib=32)
    assert str(CLAIMED_RAW_SIZE) in str(info.value)


def test_an_image_at_the_cap_is_accepted(home: ImageServer) -> None:
    at = home.add("at.raw.xz", Route(forged_xz(2**30)))
    assert probe_raw_size(session(), at, max_raw_gib=1) == 2**30
    over = home.add("over.raw.xz", Route(forged_xz(2**30 + 1)))
    with pytest.raises(ImageTooLarge):
        probe_raw_size(session(), over, max_raw_gib=1)
