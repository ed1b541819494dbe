"""The xz decoder child process (fedimg.xzdecoder) and its parent side (fedimg.xzproc).

The decoding loop is tested in this process through real pipes (frames parsed back);
ChildRaw against real child processes and a real loopback HTTP server
(devel.images.ImageServer). Upload-level tests (moto) are in test_snapshot.py.
"""

from __future__ import annotations

import hashlib
import itertools
import lzma
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
import requests

from devel.images import BLOCK, ImageFacts, ImageServer, Route, build_raw_xz, concatenate_streams
from fedimg import xzdecoder, xzproc
from fedimg.childio import ChildIO
from fedimg.download import (
    CHILD,
    PARALLEL,
    SPOOLED_THREAD,
    THREAD,
    ChecksumMismatch,
    CorruptImage,
    DownloadError,
    choose_reader,
    probe_raw_size,
    stream_raw,
)
from fedimg.ebsblocks import BLOCK_SIZE
from fedimg.priority import BACKGROUND_STEP
from fedimg.readahead import ReadAhead
from fedimg.xzdecoder import BLOCK as BLOCK_FRAME
from fedimg.xzdecoder import END, ERROR, HEADER, HELLO, RAW
from fedimg.xzlib import (
    BlockDecoder,
    LiblzmaBlocks,
    StdlibBlocks,
    XzDataError,
    XzStreams,
    load_liblzma,
)
from fedimg.xzproc import ChildRaw
from tests.pipes import Pipes

ROOT = Path(__file__).resolve().parent.parent
STEP = 64 * 1024


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> ImageFacts:
    """One xz block; data, zero gaps and a non-zero partial last block."""
    return build_raw_xz(
        tmp_path_factory.mktemp("img") / "img.raw.xz",
        24 * BLOCK + 777,
        {0: b"boot", 3: b"\x01" * BLOCK, 9: b"text " * 900, 11: bytes(BLOCK - 1) + b"z", 24: b"e"},
    )


@pytest.fixture(scope="module")
def noisy(tmp_path_factory: pytest.TempPathFactory) -> ImageFacts:
    """Incompressible data: a damaged byte lands in real xz data."""
    return build_raw_xz(tmp_path_factory.mktemp("noisy") / "noisy.raw.xz", 6 * BLOCK, range(6))


# ---------------------------------------------------------------------------
# Which reader stream_raw picks (pure)


@pytest.mark.parametrize(
    ("raw_size", "parts", "spooled", "expected"),
    [
        (10, None, False, THREAD),  # a plain int: the chunk iterator it was promised
        (1 << 40, None, False, THREAD),
        (10, 3, False, PARALLEL),
        (1 << 40, 3, True, PARALLEL),
        (100, 1, False, CHILD),  # at the threshold
        (99, 1, False, THREAD),
        (100, 0, False, CHILD),  # an index too large to plan: one stream
        (99, 0, False, THREAD),
        (100, 1, True, CHILD),  # spooled, fed from the spool
        (99, 1, True, SPOOLED_THREAD),
    ],
)
def test_choose_reader(raw_size: int, parts: int | None, spooled: bool, expected: str) -> None:
    assert choose_reader(raw_size, parts, spooled=spooled, child_min_raw=100) == expected


# ---------------------------------------------------------------------------
# The child's decoding loop, in this process


Frame = tuple[bytes, int, int, bytes]


MakeDecoder = Callable[[int], BlockDecoder]


def liblzma_blocks(step: int) -> BlockDecoder:
    lib = load_liblzma()
    assert lib is not None, "liblzma, which the standard library's lzma uses, must load"
    return LiblzmaBlocks(lib)


@pytest.fixture(params=[liblzma_blocks, StdlibBlocks], ids=["liblzma", "lzma"])
def make_decoder(request: pytest.FixtureRequest) -> MakeDecoder:
    """Each of the child's two decoders: what they send must not differ."""
    return request.param


def run_decoder(
    data: bytes, raw_size: int, make_decoder: MakeDecoder, step: int = STEP
) -> list[Frame]:
    """What the decoder writes for ``data`` through real pipes, as (kind, a, b, payload) frames."""
    with Pipes() as pipes:
        pipes.feed(data)
        pipes.drain()
        xzdecoder.decode(ChildIO(pipes.in_r, pipes.out_w), raw_size, make_decoder(step))
    return parse_frames(bytes(pipes.received))


def parse_frames(stream: bytes) -> list[Frame]:
    frames: list[Frame] = []
    pos = 0
    while pos < len(stream):
        kind, a, b = HEADER.unpack_from(stream, pos)
        pos += HEADER.size
        size = BLOCK_SIZE if kind == BLOCK_FRAME else b if kind == ERROR else 0
        frames.append((kind, a, b, stream[pos : pos + size]))
        pos += size
    assert pos == len(stream), "a frame was cut short"
    return frames


def blocks_of(frames: list[Frame]) -> dict[int, str]:
    return {a: hashlib.sha256(p).hexdigest() for kind, a, _, p in frames if kind == BLOCK_FRAME}


@pytest.mark.parametrize("step", [1000, STEP, 3 * BLOCK])
def test_the_decoder_sends_only_the_non_zero_blocks(
    image: ImageFacts, step: int, make_decoder: MakeDecoder
) -> None:
    frames = run_decoder(image.path.read_bytes(), image.raw_size, make_decoder, step)
    assert blocks_of(frames) == image.block_digests  # the partial last one zero-padded
    assert [a for kind, a, _, _ in frames if kind == BLOCK_FRAME] == list(image.nonzero_blocks)
    assert frames[-1][:3] == (END, 0, image.raw_size)
    counts = [b for kind, _, b, _ in frames if kind in (BLOCK_FRAME, RAW, END)]
    assert counts == sorted(counts), "raw bytes decoded only grow"


def test_the_decoder_reports_progress_through_zeros(
    tmp_path: Path, make_decoder: MakeDecoder
) -> None:
    facts = build_raw_xz(tmp_path / "zeros.raw.xz", 40 * BLOCK, {39: b"last"})
    frames = run_decoder(facts.path.read_bytes(), facts.raw_size, make_decoder)
    progress = [b for kind, _, b, _ in frames if kind == RAW]
    assert len(progress) >= 2 and progress[-1] < facts.raw_size
    assert all(
        later - earlier >= xzdecoder.PROGRESS_BYTES
        for earlier, later in itertools.pairwise(progress)
    )
    assert blocks_of(frames) == facts.block_digests


def test_the_decoder_reads_concatenated_streams_with_padding(
    tmp_path: Path, make_decoder: MakeDecoder
) -> None:
    a = build_raw_xz(tmp_path / "a.raw.xz", 3 * BLOCK + 5, {3: b"a"})
    b = build_raw_xz(tmp_path / "b.raw.xz", 4 * BLOCK, {0: b"b", 2: b"c"})
    concatenate_streams(tmp_path / "ab.raw.xz", [a.path, b.path], padding=8)
    data = (tmp_path / "ab.raw.xz").read_bytes()
    frames = run_decoder(data, a.raw_size + b.raw_size, make_decoder)
    raw = lzma.decompress(a.path.read_bytes()) + lzma.decompress(b.path.read_bytes())
    expected = {
        i: hashlib.sha256(raw[i * BLOCK : (i + 1) * BLOCK].ljust(BLOCK, b"\0")).hexdigest()
        for i in range(-(-len(raw) // BLOCK))
        if any(raw[i * BLOCK : (i + 1) * BLOCK])
    }
    assert blocks_of(frames) == expected and sorted(expected) == [3, 5]  # a and b share 3
    assert frames[-1][0] == END


def damaged(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :]


@pytest.mark.parametrize(
    ("mangle", "declared", "at_end", "says"),
    [
        (damaged, 0, 0, "corrupt"),
        (lambda d: d[: len(d) - 100], 0, 1, "ends before its first stream"),
        (lambda d: d[:3], 0, 1, "not an xz file"),
        (lambda d: b"PK\x03\x04" + d[4:], 0, 0, "corrupt"),
        (lambda d: d + b"\0\0\0", 0, 1, "padding"),
        (lambda d: d + b"\0\0\0\0" + b"garbage!" * 4, 0, 0, "corrupt"),
        (lambda d: d, -1, 0, "more than the declared"),
        (lambda d: d, +1, 1, "decompresses to"),
    ],
    ids=[
        "damaged",
        "truncated",
        "too-short",
        "not-xz",
        "odd-padding",
        "trailing",
        "bigger",
        "smaller",
    ],
)
def test_the_decoder_reports_bad_data(
    noisy: ImageFacts,
    mangle: Callable[[bytes], bytes],
    declared: int,
    at_end: int,
    says: str,
    make_decoder: MakeDecoder,
) -> None:
    frames = run_decoder(mangle(noisy.path.read_bytes()), noisy.raw_size + declared, make_decoder)
    kind, a, b, message = frames[-1]
    assert (kind, a, b) == (ERROR, at_end, len(message))
    assert says in message.decode()
    assert END not in [f[0] for f in frames]


def test_xz_streams_in_this_process_too(noisy: ImageFacts) -> None:
    xz = XzStreams(STEP)
    raw = b"".join(xz.feed(noisy.path.read_bytes()))
    xz.finish()
    assert raw == lzma.decompress(noisy.path.read_bytes()) and xz.streams == 1
    two = XzStreams(STEP)
    list(two.feed(noisy.path.read_bytes()))
    with pytest.raises(XzDataError, match="truncated"):  # a second stream, cut short
        list(two.feed(noisy.path.read_bytes()[:-50]))
        two.finish()


@pytest.mark.parametrize("argv", [[], ["10"], ["x", "10"], ["0", "10"], ["10", "-1"]])
def test_the_child_refuses_bad_arguments(argv: list[str]) -> None:
    assert xzdecoder.main(argv) == xzdecoder.USAGE


# ---------------------------------------------------------------------------
# ChildRaw with real child processes


def serve(server: ImageServer, facts: ImageFacts, name: str = "", **faults: object) -> str:
    return server.add(name or facts.path.name, Route(facts.path, **faults))  # type: ignore[arg-type]


def from_http(session: requests.Session, url: str, sha256: str) -> ChildRaw:
    raw = stream_raw(session, url, sha256, probe_raw_size(session, url), child_min_raw=0)
    assert isinstance(raw, ChildRaw)
    return raw


def from_bytes(
    data: bytes,
    raw_size: int,
    *,
    sha256: str = "",
    command: list[str] | None = None,
    fallback: Callable[[], Iterator[bytes]] = lambda: iter(()),
    piece: int = STEP,
) -> ChildRaw:
    """A ChildRaw fed ``data`` (published with ``sha256``, by default its own)."""

    def pieces() -> Iterator[bytes]:
        for offset in range(0, len(data), piece):
            yield data[offset : offset + piece]

    return ChildRaw(
        "http://127.0.0.1:9/img.raw.xz",
        sha256 or hashlib.sha256(data).hexdigest(),
        raw_size,
        pieces,
        fallback=fallback,
        step=STEP,
        command=command,
    )


def drain(raw: ChildRaw, got: dict[int, bytes] | None = None) -> dict[int, bytes]:
    got = {} if got is None else got
    for item in raw.blocks():
        if item is not None:
            got[item[0]] = item[1]
    return got


def digests(blocks: dict[int, bytes]) -> dict[int, str]:
    return {i: hashlib.sha256(b).hexdigest() for i, b in blocks.items()}


def assert_reaped(pid: int) -> None:
    """``pid`` was a child of this process and is neither running nor a zombie now."""
    assert pid > 0
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # reaped already: no longer ours
    if psutil.pid_exists(pid):  # the number may have been reused, never by our child
        assert psutil.Process(pid).ppid() != os.getpid()


@pytest.mark.integration
def test_the_child_decodes_an_image_downloaded_over_http(
    server: ImageServer, session: requests.Session, image: ImageFacts
) -> None:
    raw = from_http(session, serve(server, image), image.sha256)
    seen: list[int] = []
    got: dict[int, bytes] = {}
    for item in raw.blocks():
        seen.append(raw.raw_done)
        if item is not None:
            got[item[0]] = item[1]
    assert digests(got) == image.block_digests
    assert raw.raw_done == image.raw_size == seen[-1] and seen == sorted(seen)
    assert raw.decoder == "liblzma"  # the library the standard library's lzma is built on
    assert raw.returncode == 0
    assert_reaped(raw.pid)


def test_the_feeder_and_the_reader_give_the_cpu_to_the_child_first(
    noisy: ImageFacts, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = xzproc.background_thread
    asked: dict[str, int] = {}

    def spy() -> bool:
        done = real()
        asked[threading.current_thread().name] = os.getpriority(
            os.PRIO_PROCESS, threading.get_native_id()
        )
        return done

    monkeypatch.setattr(xzproc, "background_thread", spy)
    mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    background = min(19, os.getpriority(os.PRIO_PROCESS, os.getpid()) + BACKGROUND_STEP)
    raw = from_bytes(noisy.path.read_bytes(), noisy.raw_size)
    assert digests(drain(raw)) == noisy.block_digests
    assert asked == {"xz-feeder": background, "xz-frames": background}
    assert background != mine
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == mine
    assert_reaped(raw.pid)


@pytest.mark.integration
def test_a_spooled_download_is_fed_from_the_spool(
    server: ImageServer, session: requests.Session, image: ImageFacts
) -> None:
    raw = from_http(session, serve(server, image, "norange.raw.xz", ranges=False), image.sha256)
    assert raw.spool is not None
    assert digests(drain(raw)) == image.block_digests
    assert raw.spool.file.closed
    assert_reaped(raw.pid)


@pytest.mark.integration
def test_a_cut_download_is_a_download_error(
    server: ImageServer, session: requests.Session, noisy: ImageFacts
) -> None:
    url = serve(server, noisy, "cut.raw.xz", cut_after=noisy.compressed_size // 2, cuts=1)
    raw = stream_raw(session, url, noisy.sha256, probe_raw_size(session, url), child_min_raw=0)
    assert isinstance(raw, ChildRaw)
    with pytest.raises(DownloadError) as info:
        drain(raw)
    assert type(info.value) is DownloadError and info.value.url == url
    assert_reaped(raw.pid)


@pytest.mark.integration
def test_a_wrong_checksum_holds_back_the_last_block(image: ImageFacts) -> None:
    raw = from_bytes(
        image.path.read_bytes(), image.raw_size, sha256=hashlib.sha256(b"other").hexdigest()
    )
    got: dict[int, bytes] = {}
    with pytest.raises(ChecksumMismatch):
        drain(raw, got)
    assert sorted(got) == list(image.nonzero_blocks[:-1])
    assert_reaped(raw.pid)


@pytest.mark.integration
@pytest.mark.parametrize(
    ("mangle", "published", "error", "says"),
    [
        (damaged, "own", CorruptImage, "corrupt"),
        (lambda d: d[: len(d) - 100], "own", CorruptImage, "ends before"),
        (lambda d: d[: len(d) - 100], "whole", ChecksumMismatch, "sha256"),
        (lambda d: d + b"\0" * 4 + d, "own", CorruptImage, "more than the declared"),
    ],
    ids=["damaged", "truncated", "truncated-download", "bigger"],
)
def test_bad_data_fails_in_the_child(
    noisy: ImageFacts,
    mangle: Callable[[bytes], bytes],
    published: str,
    error: type[DownloadError],
    says: str,
) -> None:
    """A truncated file is a corrupt image, or a bad download if the whole file was published."""
    whole = noisy.path.read_bytes()
    data = mangle(whole)
    sha = hashlib.sha256(data if published == "own" else whole).hexdigest()
    raw = from_bytes(data, noisy.raw_size, sha256=sha)
    got: dict[int, bytes] = {}
    with pytest.raises(error, match=says) as info:
        drain(raw, got)
    assert type(info.value) is error and info.value.url == raw.url
    assert len(got) < len(noisy.nonzero_blocks)
    assert_reaped(raw.pid)


@pytest.mark.integration
def test_closing_early_kills_and_reaps_the_busy_child(noisy: ImageFacts) -> None:
    raw = from_bytes(noisy.path.read_bytes(), noisy.raw_size)
    blocks = raw.blocks()
    first = next(item for item in blocks if item is not None)
    assert first[0] == 0
    blocks.close()  # what a consumer giving up does; upload_snapshot also calls close()
    assert raw.returncode is not None
    assert_reaped(raw.pid)
    raw.close()  # again: nothing left to do


@pytest.mark.integration
def test_a_failing_download_kills_and_reaps_the_waiting_child(noisy: ImageFacts) -> None:
    data = noisy.path.read_bytes()

    def pieces() -> Iterator[bytes]:
        yield data[:1000]
        raise DownloadError("http://127.0.0.1:9/img.raw.xz", "connection reset")

    raw = ChildRaw(
        "http://127.0.0.1:9/img.raw.xz",
        noisy.sha256,
        noisy.raw_size,
        pieces,
        fallback=lambda: iter(()),
        step=STEP,
    )
    with pytest.raises(DownloadError, match="connection reset"):
        drain(raw)
    assert raw.returncode == -signal.SIGKILL, "the child was waiting for more input"
    assert_reaped(raw.pid)


@pytest.mark.integration
@pytest.mark.parametrize(
    "command",
    [["/nonexistent/python3"], [sys.executable, "-c", "pass"]],
    ids=["cannot-start", "no-hello"],
)
def test_a_child_that_cannot_run_falls_back_to_this_process(
    image: ImageFacts, command: list[str]
) -> None:
    raw_bytes = lzma.decompress(image.path.read_bytes())
    chunks = [raw_bytes[i : i + 100_000] for i in range(0, len(raw_bytes), 100_000)]
    raw = from_bytes(
        image.path.read_bytes(), image.raw_size, command=command, fallback=lambda: iter(chunks)
    )
    assert digests(drain(raw)) == image.block_digests
    assert raw.raw_done == image.raw_size
    if raw.pid:  # it started, and never said HELLO
        assert_reaped(raw.pid)


@pytest.mark.integration
def test_the_fallback_may_be_a_block_source(
    server: ImageServer, session: requests.Session, image: ImageFacts
) -> None:
    url = serve(server, image, "fallback.raw.xz", ranges=False)
    probed = probe_raw_size(session, url)
    spooled = stream_raw(session, url, image.sha256, probed)  # small: decoded by a worker
    assert not isinstance(spooled, ChildRaw | ReadAhead)
    raw = ChildRaw(
        url,
        image.sha256,
        image.raw_size,
        lambda: iter(()),
        fallback=lambda: spooled,
        step=STEP,
        command=["/nonexistent/python3"],
    )
    assert digests(drain(raw)) == image.block_digests
    assert raw.raw_done == image.raw_size


def fake_child(first: bytes, *rest: bytes) -> list[str]:
    """A child that writes its ``first`` frame, reads all of its input (as the real
    one does before its end report), then writes the ``rest`` and exits."""
    script = (
        "import sys; out = sys.stdout.buffer; "
        f"out.write({first!r}); out.flush(); sys.stdin.buffer.read(); "
        f"out.write({b''.join(rest)!r}); out.flush()"
    )
    return [sys.executable, "-c", script]


HELLO_FRAME = HEADER.pack(HELLO, xzdecoder.PROTOCOL, 0)


@pytest.mark.integration
@pytest.mark.parametrize(
    ("frames", "error", "says"),
    [
        ((HELLO_FRAME, HEADER.pack(b"Q", 0, 0)), DownloadError, "frame"),
        ((HELLO_FRAME,), DownloadError, "before its end report"),
        ((HELLO_FRAME, HEADER.pack(BLOCK_FRAME, 0, 10), b"x" * 100), DownloadError, "before"),
        ((HEADER.pack(HELLO, 99, 0),), DownloadError, "HELLO"),
        ((HELLO_FRAME, HEADER.pack(END, 0, 10)), CorruptImage, "declared"),
    ],
    ids=["unknown-frame", "exits", "cut-block", "wrong-protocol", "wrong-size"],
)
def test_a_child_breaking_the_protocol(
    image: ImageFacts, frames: tuple[bytes, ...], error: type[DownloadError], says: str
) -> None:
    raw = from_bytes(image.path.read_bytes(), image.raw_size, command=fake_child(*frames))
    with pytest.raises(error, match=says) as info:
        drain(raw)
    assert type(info.value) is error
    assert_reaped(raw.pid)


ORPHAN = """
import sys, threading
from fedimg.xzproc import ChildRaw
data = open(sys.argv[1], "rb").read()

def pieces():
    yield data[: len(data) // 2]
    threading.Event().wait()  # the download stalls: the child waits for more

raw = ChildRaw("http://127.0.0.1:9/x", "0" * 64, int(sys.argv[2]), pieces,
               fallback=lambda: iter(()), step=65536)
blocks = raw.blocks()
next(blocks)
print(raw.pid, flush=True)
threading.Event().wait()
"""


@pytest.mark.integration
def test_the_child_exits_when_its_parent_is_killed(noisy: ImageFacts) -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", ORPHAN, str(noisy.path), str(noisy.raw_size)],
        stdout=subprocess.PIPE,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert parent.stdout is not None
        pid = int(parent.stdout.readline())
        child = psutil.Process(pid)
        assert child.ppid() == parent.pid and child.status() != psutil.STATUS_ZOMBIE
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=30)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                break  # it exited; reaping an orphan is init's business
        except psutil.NoSuchProcess:
            break
        time.sleep(0.05)
    else:
        child.kill()
        pytest.fail(f"the decoder process {pid} outlived its killed parent by 30 s")
