"""Build real ``.raw.xz`` disk images and serve them over HTTP, for tests, demos, benchmarks.

An image is described block by block (512 KiB, the EBS snapshot block size):
every block not named is zeros, so a several-GiB image with a few MiB of data
costs a few MiB of work per named block and a fast stream of zeros otherwise.
The raw image is never held in memory: it is generated block by block and
streamed into ``lzma`` (in process) or the ``xz`` binary (``xz_threads``).

The returned ``ImageFacts`` say what a correct upload must produce: which
blocks are not all zero and the sha256 of each, plus the sha256 and size of
the compressed file (what a compose's images.json lists).
"""

from __future__ import annotations

import hashlib
import logging
import lzma
import random
import re
import shutil
import subprocess
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, Any

log = logging.getLogger(__name__)

BLOCK = 524288
ZERO_BLOCK = bytes(BLOCK)
_READ = 1 << 20


@dataclass(frozen=True)
class ImageFacts:
    """What is known about a generated image.

    ``block_digests`` holds the sha256 of every non-zero block as an EBS
    snapshot stores it: the final partial block (when ``raw_size`` is not a
    multiple of 512 KiB) is zero-padded to 512 KiB before hashing.
    """

    path: Path
    raw_size: int
    sha256: str
    compressed_size: int
    nonzero_blocks: tuple[int, ...]
    block_digests: dict[int, str]

    @property
    def blocks_total(self) -> int:
        return -(-self.raw_size // BLOCK)


def random_block(seed: int, index: int, size: int = BLOCK) -> bytes:
    """Deterministic incompressible bytes for block ``index`` of image ``seed``."""
    return random.Random(f"fedimg-image:{seed}:{index}").randbytes(size)  # noqa: S311


def compressible_block(seed: int, index: int, size: int = BLOCK) -> bytes:
    """Deterministic text-like bytes (compresses well, never all zero)."""
    rng = random.Random(f"fedimg-text:{seed}:{index}")  # noqa: S311
    words = [f"pkg-{rng.randrange(4096):04x} " for _ in range(256)]
    line = ("".join(words) + "\n").encode()
    out = bytearray()
    while len(out) < size:
        out += line[rng.randrange(64) :]
    return bytes(out[:size])


class LazyBlocks(Mapping[int, bytes]):
    """Block contents generated on access: random or compressible, by index.

    Lets ``build_raw_xz`` write hundreds of MiB of data without holding it.
    """

    def __init__(
        self, random_indices: Iterable[int], compressible_indices: Iterable[int], seed: int
    ) -> None:
        self.random_indices = frozenset(random_indices)
        self.compressible_indices = frozenset(compressible_indices)
        overlap = self.random_indices & self.compressible_indices
        if overlap:
            raise ValueError(f"blocks both random and compressible: {sorted(overlap)[:5]}")
        self.seed = seed

    def __getitem__(self, index: int) -> bytes:
        if index in self.random_indices:
            return random_block(self.seed, index)
        if index in self.compressible_indices:
            return compressible_block(self.seed, index)
        raise KeyError(index)

    def __iter__(self) -> Iterator[int]:
        return iter(sorted(self.random_indices | self.compressible_indices))

    def __len__(self) -> int:
        return len(self.random_indices) + len(self.compressible_indices)


def sparse_layout(
    raw_size: int, nonzero_fraction: float, compressible_fraction: float, seed: int = 0
) -> LazyBlocks:
    """A disk-like layout: mostly zeros, with runs of random and of text-like blocks.

    ``nonzero_fraction`` of the blocks carry data, in runs of 1 to 64 blocks
    spread over the whole disk (so zero skipping and re-blocking are both
    exercised); ``compressible_fraction`` of those are text-like, the rest
    incompressible.
    """
    if not 0.0 <= nonzero_fraction <= 1.0 or not 0.0 <= compressible_fraction <= 1.0:
        raise ValueError("fractions must be within [0, 1]")
    blocks_total = -(-raw_size // BLOCK)
    wanted = round(blocks_total * nonzero_fraction)
    rng = random.Random(f"fedimg-layout:{seed}")  # noqa: S311
    chosen: set[int] = set()
    while len(chosen) < wanted:
        run = min(rng.randint(1, 64), wanted - len(chosen))
        start = rng.randrange(blocks_total)
        chosen.update(range(start, min(start + run, blocks_total)))
    ordered = sorted(chosen)
    n_text = round(len(ordered) * compressible_fraction)
    # Alternate whole runs between the two kinds by picking every other 64-block stretch.
    text = {i for i in ordered if (i // 64) % 2 == 0}
    if len(text) > n_text:
        text = set(sorted(text)[:n_text])
    else:
        rest = [i for i in ordered if i not in text]
        text.update(rest[: n_text - len(text)])
    return LazyBlocks([i for i in ordered if i not in text], text, seed)


def _block_contents(
    raw_size: int, data_blocks: Mapping[int, bytes] | Iterable[int], seed: int
) -> Mapping[int, bytes]:
    blocks_total = -(-raw_size // BLOCK)
    if isinstance(data_blocks, Mapping):
        contents: Mapping[int, bytes] = data_blocks
    else:
        contents = LazyBlocks(data_blocks, (), seed)
    for index in contents:
        if not 0 <= index < blocks_total:
            raise ValueError(f"block {index} is outside an image of {blocks_total} blocks")
    return contents


def _raw_blocks(raw_size: int, contents: Mapping[int, bytes]) -> Iterator[tuple[int, bytes, bytes]]:
    """(index, bytes written to the image, the block as a snapshot holds it)."""
    blocks_total = -(-raw_size // BLOCK)
    for index in range(blocks_total):
        length = min(BLOCK, raw_size - index * BLOCK)
        data = contents.get(index)
        if data is None:
            yield index, ZERO_BLOCK[:length], ZERO_BLOCK
            continue
        if isinstance(contents, LazyBlocks):
            data = data[:length]  # generated data fills whatever room the block has
        if len(data) > length:
            raise ValueError(f"block {index} has {len(data)} bytes, room for {length}")
        padded = data + bytes(BLOCK - len(data))
        yield index, padded[:length], padded


def build_raw_xz(
    path: Path,
    raw_size: int,
    data_blocks: Mapping[int, bytes] | Iterable[int],
    *,
    seed: int = 0,
    preset: int = 0,
    xz_threads: int | None = None,
    xz_block_size: int | None = None,
) -> ImageFacts:
    """Write an xz-compressed raw disk image of ``raw_size`` bytes to ``path``.

    ``data_blocks`` is either explicit contents (index -> up to 512 KiB, zero
    padded) or block indices to fill with deterministic incompressible data
    from ``seed``. With ``xz_threads`` (0 = one per core) or ``xz_block_size``
    the ``xz`` binary compresses (multi-block output, fast for big images);
    otherwise ``lzma`` in process (one block, one stream).
    """
    if raw_size <= 0:
        raise ValueError("raw_size must be positive")
    path = Path(path)
    contents = _block_contents(raw_size, data_blocks, seed)
    nonzero: list[int] = []
    digests: dict[int, str] = {}

    def blocks() -> Iterator[bytes]:
        for index, written, padded in _raw_blocks(raw_size, contents):
            if padded is not ZERO_BLOCK and padded != ZERO_BLOCK:
                nonzero.append(index)
                digests[index] = hashlib.sha256(padded).hexdigest()
            yield written

    if xz_threads is None and xz_block_size is None:
        _compress_in_process(path, blocks(), preset)
    else:
        _compress_with_xz(path, blocks(), preset, xz_threads or 0, xz_block_size)
    sha256, compressed_size = file_sha256(path)
    return ImageFacts(
        path=path,
        raw_size=raw_size,
        sha256=sha256,
        compressed_size=compressed_size,
        nonzero_blocks=tuple(nonzero),
        block_digests=digests,
    )


def _compress_in_process(path: Path, blocks: Iterator[bytes], preset: int) -> None:
    compressor = lzma.LZMACompressor(format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=preset)
    with path.open("wb") as out:
        for block in blocks:
            out.write(compressor.compress(block))
        out.write(compressor.flush())


def _compress_with_xz(
    path: Path, blocks: Iterator[bytes], preset: int, threads: int, block_size: int | None
) -> None:
    xz = shutil.which("xz")
    if xz is None:
        raise FileNotFoundError("the xz binary is not on PATH")
    argv = [xz, f"-{preset}", f"--threads={threads}", "--check=crc64", "-c"]
    if block_size is not None:
        argv.append(f"--block-size={block_size}")
    with path.open("wb") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=out)
        stdin: IO[bytes] | None = proc.stdin
        assert stdin is not None
        try:
            for block in blocks:
                stdin.write(block)
        finally:
            stdin.close()
            rc = proc.wait(timeout=600)
    if rc != 0:
        raise subprocess.CalledProcessError(rc, argv)


def file_sha256(path: Path) -> tuple[str, int]:
    """Hex sha256 and size of a file, read in 1 MiB pieces."""
    digest = hashlib.sha256()
    size = 0
    with Path(path).open("rb") as f:
        while piece := f.read(_READ):
            digest.update(piece)
            size += len(piece)
    return digest.hexdigest(), size


def concatenate_streams(target: Path, parts: Iterable[Path], padding: int = 0) -> str:
    """Concatenate xz files into one multi-stream file, ``padding`` zero bytes between.

    ``padding`` must be a multiple of 4 for a valid file (xz stream padding).
    Returns the hex sha256 of the result.
    """
    with Path(target).open("wb") as out:
        for n, part in enumerate(parts):
            if n and padding:
                out.write(bytes(padding))
            with Path(part).open("rb") as f:
                shutil.copyfileobj(f, out, _READ)
    return file_sha256(target)[0]


# ---------------------------------------------------------------------------
# Serving images over HTTP (tests, the benchmark, demos)


@dataclass
class Route:
    """What the server answers for one path.

    ``content`` is a file or bytes. Faults: ``status`` other than 200 (answered
    with no body), ``ranges=False`` (Range headers ignored: a plain 200),
    ``stall_after`` (send that many body bytes, then nothing until the server
    stops), ``cut_after`` (send that many body bytes of a longer declared
    Content-Length, then close the connection) for the first ``cut_times``
    answers longer than that (None: every one).
    """

    content: Path | bytes = b""
    status: int = 200
    ranges: bool = True
    stall_after: int | None = None
    cut_after: int | None = None
    cut_times: int | None = None

    def size(self) -> int:
        if isinstance(self.content, bytes):
            return len(self.content)
        return Path(self.content).stat().st_size

    def read(self, start: int, length: int) -> Iterator[bytes]:
        if isinstance(self.content, bytes):
            for offset in range(start, start + length, _READ):
                yield self.content[offset : min(offset + _READ, start + length)]
            return
        with Path(self.content).open("rb") as f:
            f.seek(start)
            left = length
            while left > 0:
                piece = f.read(min(_READ, left))
                if not piece:
                    return
                left -= len(piece)
                yield piece


_RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """(start, end inclusive) of a single-range ``Range`` header; None if unsatisfiable.

    Raises ValueError for a header this server does not understand.
    """
    match = _RANGE_RE.match(header.strip())
    if not match or match.groups() == ("", ""):
        raise ValueError(f"unsupported Range header {header!r}")
    first, last = match.groups()
    if first == "":
        length = int(last)
        if length == 0 or size == 0:
            return None
        return max(0, size - length), size - 1
    start = int(first)
    end = size - 1 if last == "" else min(int(last), size - 1)
    if start >= size or end < start:
        return None
    return start, end


class ImageServer:
    """A threaded HTTP/1.1 file server on a free loopback port, with Range and faults.

    ``with ImageServer() as srv: srv.add("img.raw.xz", Route(path)); srv.url("img.raw.xz")``.
    ``requests`` lists (path, Range header or None) per request; ``bytes_sent``
    counts body bytes per path.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.routes: dict[str, Route] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.bytes_sent: dict[str, int] = {}
        self.cuts: dict[str, int] = {}  # answers cut short per path
        self.release = threading.Event()
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer((host, port), self._handler_class())
        self._httpd.daemon_threads = True
        self.host = host
        self.port = int(self._httpd.server_address[1])
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},  # how long stop() waits for the loop
            name="image-server",
            daemon=True,
        )

    def add(self, name: str, route: Route) -> str:
        self.routes["/" + name.lstrip("/")] = route
        return self.url(name)

    def url(self, name: str) -> str:
        return f"http://{self.host}:{self.port}/{name.lstrip('/')}"

    def start(self) -> ImageServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.release.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=10)

    def __enter__(self) -> ImageServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _count(self, path: str, sent: int) -> None:
        with self._lock:
            self.bytes_sent[path] = self.bytes_sent.get(path, 0) + sent

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("image server: " + format, *args)

            def do_HEAD(self) -> None:
                self._answer(body=False)

            def do_GET(self) -> None:
                self._answer(body=True)

            def _answer(self, body: bool) -> None:
                path = self.path.split("?", 1)[0]
                range_header = self.headers.get("Range")
                with server._lock:
                    server.requests.append((path, range_header))
                route = server.routes.get(path)
                if route is None or route.status != 200:
                    status = 404 if route is None else route.status
                    self.send_response(status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                size = route.size()
                start, end, status = 0, size - 1, 200
                if range_header and route.ranges:
                    try:
                        wanted = parse_range(range_header, size)
                    except ValueError:
                        wanted = (0, size - 1)  # RFC 9110: ignore what is not understood
                    else:
                        if wanted is None:
                            self.send_response(416)
                            self.send_header("Content-Range", f"bytes */{size}")
                            self.send_header("Content-Length", "0")
                            self.end_headers()
                            return
                        status = 206
                    start, end = wanted
                length = end - start + 1 if size else 0
                self.send_response(status)
                self.send_header("Content-Type", "application/x-xz")
                self.send_header("Accept-Ranges", "bytes" if route.ranges else "none")
                self.send_header("Content-Length", str(length))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
                self.end_headers()
                if not body or not length:
                    return
                self._send_body(path, route, start, length)

            def _send_body(self, path: str, route: Route, start: int, length: int) -> None:
                limit = length
                for fault in (route.stall_after, self._cut(path, route, length)):
                    if fault is not None:
                        limit = min(limit, fault)
                sent = 0
                try:
                    for piece in route.read(start, limit):
                        self.wfile.write(piece)
                        sent += len(piece)
                    self.wfile.flush()
                    if route.stall_after is not None and sent < length:
                        server.release.wait(timeout=600)
                except (ConnectionError, TimeoutError):
                    pass  # the client went away: what fault tests and probes do
                finally:
                    server._count(path, sent)
                if sent < length:
                    self.close_connection = True

            def _cut(self, path: str, route: Route, length: int) -> int | None:
                """Where to cut this answer short, if it is to be cut."""
                if route.cut_after is None or length <= route.cut_after:
                    return None
                with server._lock:
                    done = server.cuts.get(path, 0)
                    if route.cut_times is not None and done >= route.cut_times:
                        return None
                    server.cuts[path] = done + 1
                return route.cut_after

        return Handler
