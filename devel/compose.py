"""A generated pungi compose on disk and a loopback HTTP server for it.

``build_compose`` writes ``<root>/compose/metadata/images.json`` and
``composeinfo.json`` with productmd, and small real ``raw.xz`` images (built by
``devel.images.build_raw_xz``) whose sizes, sha256 and non-zero blocks are
known, so tests can check exactly what a snapshot must contain.

``ComposeServer`` serves the tree like kojipkgs does: GET and HEAD with HTTP
Range (206 + Content-Range), from a thread per request, on a loopback port.
Tests flip fault switches on it: 404 a path, stall a path, serve an HTML page
or arbitrary bytes instead of a file, redirect a path elsewhere, cut a file's
answers short. ``hits`` counts every request per path (whatever the answer).
"""

from __future__ import annotations

import hashlib
import http.server
import io
import logging
import re
import shutil
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import unquote, urlsplit

import productmd.composeinfo
import productmd.images

from devel.images import ImageFacts, build_raw_xz

log = logging.getLogger(__name__)

MiB: Final = 1024 * 1024
_RANGE_RE: Final = re.compile(r"^bytes=(\d*)-(\d*)$")
HTML_PAGE: Final = (
    b"<!DOCTYPE html><html><head><title>404 Not Found</title></head>"
    b"<body><h1>Not Found</h1><p>The requested URL was not found.</p></body></html>\n"
)


@dataclass(frozen=True)
class ImageSpec:
    """One image of a generated compose.

    ``data_blocks`` are the 512 KiB block indices filled with deterministic
    random data (the rest are zeros). ``format`` other than ``raw.xz`` writes
    a small opaque file (a qcow2 stand-in fedimg must ignore). ``xz_block_size``
    makes a multi-block xz file (as ``xz -T0`` writes) with blocks of that size.
    """

    variant: str = "Cloud"
    arch: str = "x86_64"
    subvariant: str = "Cloud_Base"
    raw_mib: int = 4
    data_blocks: tuple[int, ...] = (0, 1, 5)
    format: str = "raw.xz"
    type: str = "raw-xz"
    name: str | None = None
    seed: int = 0
    xz_block_size: int | None = None
    # productmd allows one image per (arch, subvariant, type, format, disc): more
    # images of one kind in one compose need discs of their own.
    disc_number: int = 1

    def file_name(self, compose_id: str) -> str:
        if self.name:
            return self.name
        stem = compose_id.replace("Fedora-", f"Fedora-{self.subvariant.replace('_', '-')}-", 1)
        return f"{stem}.{self.arch}.{self.format}"


DEFAULT_IMAGES: Final = (
    ImageSpec("Cloud", "x86_64", "Cloud_Base", raw_mib=4, data_blocks=(0, 1, 5), seed=1),
    ImageSpec("Cloud", "aarch64", "Cloud_Base", raw_mib=3, data_blocks=(0, 2, 3), seed=2),
    ImageSpec("AtomicHost", "x86_64", "AtomicHost", raw_mib=5, data_blocks=(1, 7, 9), seed=3),
    ImageSpec("Cloud", "x86_64", "Cloud_Base", format="qcow2", type="qcow2", seed=4),
)


@dataclass(frozen=True)
class BuiltImage:
    """An image written into a tree: its spec, path under compose/ and facts."""

    spec: ImageSpec
    path: str
    file: Path
    sha256: str
    size: int
    facts: ImageFacts | None

    @property
    def image_name(self) -> str:
        return Path(self.path).name


@dataclass(frozen=True)
class ComposeTree:
    """A compose written by ``build_compose``."""

    root: Path
    compose_id: str
    release_version: str
    images: tuple[BuiltImage, ...]

    @property
    def compose_dir(self) -> Path:
        return self.root / "compose"

    @property
    def images_json(self) -> Path:
        return self.compose_dir / "metadata" / "images.json"

    @property
    def composeinfo_json(self) -> Path:
        return self.compose_dir / "metadata" / "composeinfo.json"

    def raw_images(self) -> list[BuiltImage]:
        return [i for i in self.images if i.facts is not None]

    def image(self, image_name: str) -> BuiltImage:
        for built in self.images:
            if built.image_name == image_name:
                return built
        raise KeyError(image_name)

    def load_images(self) -> productmd.images.Images:
        """images.json as productmd objects (to alter and ``write_images`` in tests)."""
        images = productmd.images.Images()
        images.load(str(self.images_json))
        return images

    def write_images(self, images: productmd.images.Images) -> None:
        images.dump(str(self.images_json))


def _split_compose_id(compose_id: str) -> tuple[str, str, str, int]:
    """(short, version, date, respin) of ``Fedora-<version>-<date>.<type?><respin>``."""
    match = re.match(r"^([A-Za-z]+)-([A-Za-z0-9_]+)-(\d{8})\.[a-z]?(\d+)$", compose_id)
    if not match:
        raise ValueError(f"compose id {compose_id!r} is not like Fedora-40-20240101.0")
    short, version, date, respin = match.groups()
    return short, version, date, int(respin)


def _write_image(
    compose_dir: Path, rel: str, spec: ImageSpec
) -> tuple[str, int, ImageFacts | None]:
    """Write one image file; (sha256, size, facts) of what was written."""
    target = compose_dir / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    if spec.format == "raw.xz":
        facts = build_raw_xz(
            target,
            spec.raw_mib * MiB,
            spec.data_blocks,
            seed=spec.seed,
            xz_block_size=spec.xz_block_size,
        )
        return facts.sha256, facts.compressed_size, facts
    data = hashlib.sha256(f"{spec.seed}:{rel}".encode()).digest() * 64
    target.write_bytes(data)
    return hashlib.sha256(data).hexdigest(), len(data), None


def _image_entry(
    meta: productmd.images.Images, rel: str, spec: ImageSpec, sha256: str, size: int
) -> productmd.images.Image:
    entry = productmd.images.Image(meta)
    entry.path = rel
    entry.mtime = int(time.time())
    entry.size = size
    entry.volume_id = None
    entry.type = spec.type
    entry.format = spec.format
    entry.arch = spec.arch
    entry.disc_number = spec.disc_number
    entry.disc_count = spec.disc_number
    entry.checksums = {"sha256": sha256}
    entry.implant_md5 = None
    entry.bootable = False
    entry.subvariant = spec.subvariant
    return entry


def _composeinfo(
    compose_id: str, variant_arches: dict[str, set[str]]
) -> productmd.composeinfo.ComposeInfo:
    short, version, date, respin = _split_compose_id(compose_id)
    info = productmd.composeinfo.ComposeInfo()
    info.compose.id = compose_id
    info.compose.type = "production"
    info.compose.date = date
    info.compose.respin = respin
    info.release.name = "Fedora"
    info.release.short = short
    info.release.version = version
    info.release.type = "ga"
    for variant_id, arches in sorted(variant_arches.items()):
        variant = productmd.composeinfo.Variant(info)
        variant.id = variant.uid = variant_id
        variant.name = variant_id
        variant.type = "variant"
        variant.arches = set(arches)
        variant.paths.images = {arch: f"{variant_id}/{arch}/images" for arch in arches}
        info.variants.add(variant)
    return info


def build_compose(
    root: Path,
    compose_id: str = "Fedora-40-20240501.0",
    images: Sequence[ImageSpec] = DEFAULT_IMAGES,
) -> ComposeTree:
    """Write a compose under ``root/compose``: images and productmd metadata."""
    _short, version, date, respin = _split_compose_id(compose_id)
    compose_dir = Path(root) / "compose"
    (compose_dir / "metadata").mkdir(parents=True, exist_ok=True)
    meta = productmd.images.Images()
    meta.compose.id = compose_id
    meta.compose.type = "production"
    meta.compose.date = date
    meta.compose.respin = respin
    built: list[BuiltImage] = []
    variant_arches: dict[str, set[str]] = {}
    for spec in images:
        rel = f"{spec.variant}/{spec.arch}/images/{spec.file_name(compose_id)}"
        sha256, size, facts = _write_image(compose_dir, rel, spec)
        meta.add(spec.variant, spec.arch, _image_entry(meta, rel, spec, sha256, size))
        variant_arches.setdefault(spec.variant, set()).add(spec.arch)
        built.append(BuiltImage(spec, rel, compose_dir / rel, sha256, size, facts))
    meta.dump(str(compose_dir / "metadata" / "images.json"))
    _composeinfo(compose_id, variant_arches).dump(
        str(compose_dir / "metadata" / "composeinfo.json")
    )
    return ComposeTree(Path(root), compose_id, version, tuple(built))


def compose_message(
    tree: ComposeTree, url: str, status: str = "FINISHED", **overrides: Any
) -> dict[str, Any]:
    """A ``pungi.compose.status.change`` body for ``tree`` served at ``url``."""
    short, version, date, respin = _split_compose_id(tree.compose_id)
    body: dict[str, Any] = {
        "status": status,
        "release_type": "ga",
        "compose_label": f"RC-{date}.{respin}",
        "compose_respin": respin,
        "compose_date": date,
        "release_version": version,
        "location": url,
        "compose_type": "production",
        "release_is_layered": False,
        "release_name": "Fedora",
        "release_short": short,
        "compose_id": tree.compose_id,
    }
    body.update(overrides)
    return body


# -- the server -------------------------------------------------------------------


@dataclass
class _Faults:
    missing: set[str] = field(default_factory=set)
    stalled: set[str] = field(default_factory=set)
    replaced: dict[str, tuple[bytes, str, bool]] = field(default_factory=dict)  # +Range?
    no_range: set[str] = field(default_factory=set)
    redirected: dict[str, tuple[int, str]] = field(default_factory=dict)
    cut: dict[str, list[int]] = field(default_factory=dict)  # path: [after bytes, answers left]


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("compose server: " + format, *args)

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _serve(self, body: bool) -> None:
        owner = self.server.owner
        rel = unquote(urlsplit(self.path).path).lstrip("/")
        owner._hit(rel)
        faults = owner.faults
        if rel in faults.stalled:
            # Send nothing until the server closes or the stall is lifted.
            owner._unstall.wait(owner.stall_seconds)
            self.close_connection = True
            return
        if rel in faults.missing:
            self._send(404, HTML_PAGE, "text/html", body)
            return
        if rel in faults.redirected:
            status, location = faults.redirected[rel]
            self.send_response(status)
            self.send_header("Location", location)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if rel in faults.replaced:
            data, ctype, ranges = faults.replaced[rel]
            if ranges:
                self._send_file(data, ctype, body, True, rel)
            else:
                self._send(200, data, ctype, body)
            return
        target = (owner.root / rel).resolve()
        if owner.root.resolve() not in target.parents or not target.is_file():
            self._send(404, HTML_PAGE, "text/html", body)
            return
        ctype = "application/json" if target.suffix == ".json" else "application/octet-stream"
        self._send_file(target, ctype, body, rel not in faults.no_range, rel)

    def _send(self, status: int, data: bytes, ctype: str, body: bool) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def _send_file(
        self, target: Path | bytes, ctype: str, body: bool, ranges: bool, rel: str
    ) -> None:
        size = len(target) if isinstance(target, bytes) else target.stat().st_size
        start, end = 0, size - 1
        header = self.headers.get("Range")
        status = 200
        if header and ranges:
            parsed = _parse_range(header, size)
            if parsed is None:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            start, end = parsed
            status = 206
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Accept-Ranges", "bytes" if ranges else "none")
        self.send_header("Content-Length", str(end - start + 1))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if not body:
            return
        with io.BytesIO(target) if isinstance(target, bytes) else target.open("rb") as f:
            f.seek(start)
            left = end - start + 1
            cut_after = self.server.owner._cut_after(rel, left)
            if cut_after is not None:
                self.close_connection = True  # short of the Content-Length sent
                left = cut_after
            while left > 0:
                piece = f.read(min(left, 256 * 1024))
                if not piece:
                    break
                try:
                    self.wfile.write(piece)
                except ConnectionError:
                    return  # the client went away
                left -= len(piece)


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """(start, end) of a single ``bytes=`` range, or None if unsatisfiable."""
    match = _RANGE_RE.match(header.strip())
    if not match or size == 0:
        return None
    first, last = match.groups()
    if not first and not last:
        return None
    if not first:  # suffix: the last N bytes
        length = int(last)
        if length == 0:
            return None
        return max(0, size - length), size - 1
    start = int(first)
    end = int(last) if last else size - 1
    if start >= size or end < start:
        return None
    return start, min(end, size - 1)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    owner: ComposeServer


class ComposeServer:
    """Serve ``root`` (the directory holding ``compose/``) on a loopback port.

    ``url`` is the compose location (``http://127.0.0.1:PORT/compose``).
    """

    def __init__(self, root: Path, host: str = "127.0.0.1", stall_seconds: float = 60.0) -> None:
        self.root = Path(root)
        self.host = host
        self.stall_seconds = stall_seconds
        self.faults = _Faults()
        self.hits: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._unstall = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        assert self._server is not None, "server not started"
        return int(self._server.server_address[1])

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.base_url}/compose"

    def url_of(self, rel: str) -> str:
        """The URL of a path relative to the compose location."""
        return f"{self.url}/{rel}"

    # -- fault switches (paths relative to the compose location) -------------
    def missing(self, rel: str) -> None:
        """Answer 404 (with an HTML page) for ``rel``."""
        self.faults.missing.add(f"compose/{rel}")

    def stall(self, rel: str) -> None:
        """Accept requests for ``rel`` and never answer (until ``reset`` or close)."""
        self._unstall.clear()
        self.faults.stalled.add(f"compose/{rel}")

    def html(self, rel: str) -> None:
        """Serve an HTML error page with status 200 for ``rel``."""
        self.replace(rel, HTML_PAGE, "text/html; charset=utf-8")

    def replace(
        self, rel: str, data: bytes, content_type: str = "application/json", ranges: bool = False
    ) -> None:
        """Serve ``data`` for ``rel``: with status 200, or as a file (Range too) if ``ranges``."""
        self.faults.replaced[f"compose/{rel}"] = (data, content_type, ranges)

    def redirect(self, rel: str, location: str, status: int = 302) -> None:
        """Answer ``rel`` with a redirect to ``location`` (any URL, any host)."""
        self.faults.redirected[f"compose/{rel}"] = (status, location)

    def cut(self, rel: str, after: int, answers: int | None = None) -> None:
        """Close the connection after ``after`` body bytes of ``rel`` (Range answers too).

        Only the next ``answers`` answers are cut when it is set; every one otherwise.
        """
        self.faults.cut[f"compose/{rel}"] = [after, -1 if answers is None else answers]

    def _cut_after(self, rel: str, length: int) -> int | None:
        """Body bytes to send of an answer of ``length`` before cutting it, or None."""
        with self._lock:
            fault = self.faults.cut.get(rel)
            if fault is None or fault[1] == 0 or fault[0] >= length:
                return None
            if fault[1] > 0:
                fault[1] -= 1
            return fault[0]

    def ignore_ranges(self, rel: str) -> None:
        """Answer Range requests for ``rel`` with the whole file (status 200)."""
        self.faults.no_range.add(f"compose/{rel}")

    def reset(self) -> None:
        """Lift every fault and forget the hit counts."""
        self._unstall.set()
        self.faults = _Faults()
        with self._lock:
            self.hits.clear()

    def hits_of(self, rel: str) -> int:
        with self._lock:
            return self.hits[f"compose/{rel}"]

    def _hit(self, rel: str) -> None:
        with self._lock:
            self.hits[rel] += 1

    # -- lifecycle --------------------------------------------------------------
    def start(self) -> ComposeServer:
        # Port 0: the kernel picks a free loopback port, with no window for a race.
        server = _Server((self.host, 0), _Handler)
        server.owner = self
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self._thread.start()
        return self

    def close(self) -> None:
        self._unstall.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def __enter__(self) -> ComposeServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def corrupt_copy(source: Path, target: Path, offset: int, length: int = 64) -> None:
    """Copy an xz file flipping ``length`` bytes at ``offset`` (a corrupt image)."""
    shutil.copyfile(source, target)
    with target.open("r+b") as f:
        f.seek(offset)
        data = bytearray(f.read(length))
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in data))


def expected_blocks(facts: ImageFacts) -> dict[int, str]:
    """The snapshot a correct upload produces: block index -> sha256 of its 512 KiB."""
    return dict(facts.block_digests)
