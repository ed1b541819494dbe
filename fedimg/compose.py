"""Read a finished compose's metadata and pick the cloud images fedimg stages.

``read_compose`` fetches ``metadata/images.json`` (and, when present,
``metadata/composeinfo.json`` for the release) under a compose location with
the HTTP seam and parses them with ``productmd``. It returns the ``raw.xz``
images of the configured variants and arches as frozen ``CloudImage`` values,
each with an absolute URL that is guaranteed to lie under the compose location.

Anything wrong with the compose as a whole (location not allowed, metadata
missing, an HTML error page, invalid JSON, not productmd metadata, a header
version productmd cannot read, another compose's metadata) raises
``ComposeError``. An image entry that cannot be staged safely (a path leaving
the compose, no sha256, a bad name) is set aside in ``ComposeImages.rejected``
with the reason, so the other images of the compose still go ahead. At most
``fedimg.compose.max_images`` entries are taken from one compose, cut from the
JSON before productmd reads it; the rest are set aside together, as ONE
rejected entry saying how many and why.
"""

from __future__ import annotations

import functools
import json
import logging
import posixpath
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import quote, unquote, urlsplit

import productmd.common
import productmd.composeinfo
import productmd.images
import requests

from fedimg.config import FedimgConfig
from fedimg.messages import (
    COMPOSE_ID_RE,
    IMAGE_NAME_RE,
    SHA256_RE,
    InvalidMessage,
    check_http_url,
)

log = logging.getLogger(__name__)

IMAGES_JSON: Final = "metadata/images.json"
COMPOSEINFO_JSON: Final = "metadata/composeinfo.json"
RAW_XZ: Final = "raw.xz"
MAX_METADATA_BYTES: Final = 64 * 1024 * 1024
_CHUNK: Final = 256 * 1024
_SAFE_PATH_RE: Final = re.compile(r"^[A-Za-z0-9._+@=,~-]+(?:/[A-Za-z0-9._+@=,~-]+)*$")


class ComposeError(Exception):
    """The compose cannot be read; the text says why."""


@dataclass(frozen=True)
class CloudImage:
    """One cloud raw.xz image of a compose, as images.json describes it."""

    compose_id: str
    variant: str
    arch: str
    subvariant: str
    format: str
    path: str
    url: str
    size: int
    sha256: str
    image_name: str
    type: str
    release: str = ""


@dataclass(frozen=True)
class RejectedImage:
    """An images.json entry that matched the selection but cannot be staged.

    The entries beyond ``fedimg.compose.max_images`` are one RejectedImage
    together, its ``path`` that of images.json.
    """

    path: str
    reason: str

    @property
    def image_name(self) -> str:
        return posixpath.basename(self.path)[:255] or "?"


@dataclass(frozen=True)
class ComposeImages:
    """What ``read_compose`` found: the images to stage and those set aside."""

    compose_id: str
    release_version: str
    images: list[CloudImage]
    rejected: list[RejectedImage] = field(default_factory=list)


# -- pure parts ----------------------------------------------------------------


def image_url(location: str, path: str) -> str:
    """The URL of ``path`` under ``location``; ComposeError if it would leave it.

    Rejected: absolute paths, ``..`` or ``.`` segments, empty segments,
    backslashes, URLs (``scheme:`` or ``//host``), percent-escapes and any
    character outside a conservative file-name set.
    """
    if not isinstance(path, str) or not path:
        raise ComposeError("empty image path")
    if path.startswith("/") or "\\" in path or "%" in path or ":" in path:
        raise ComposeError(f"image path {path[:200]!r} is not relative to the compose")
    segments = path.split("/")
    if any(seg in ("", ".", "..") for seg in segments) or not _SAFE_PATH_RE.match(path):
        raise ComposeError(f"image path {path[:200]!r} leaves the compose or is not a plain path")
    base = location.rstrip("/")
    url = f"{base}/{quote(path, safe='/')}"
    parts, base_parts = urlsplit(url), urlsplit(base)
    inside = (
        parts.scheme == base_parts.scheme
        and parts.netloc == base_parts.netloc
        and unquote(parts.path).startswith(unquote(base_parts.path).rstrip("/") + "/")
    )
    if not inside:  # unreachable with the checks above; kept as the invariant
        raise ComposeError(f"image path {path[:200]!r} leaves the compose")
    return url


def select_images(
    images: productmd.images.Images,
    location: str,
    compose_id: str,
    release: str,
    *,
    variants: Iterable[str],
    arches: Iterable[str],
) -> tuple[list[CloudImage], list[RejectedImage]]:
    """The raw.xz images of ``variants`` x ``arches``, in a stable order."""
    wanted_variants, wanted_arches = set(variants), set(arches)
    chosen: dict[str, CloudImage] = {}
    rejected: dict[str, RejectedImage] = {}
    for variant in sorted(images.images):
        if variant not in wanted_variants:
            continue
        for arch in sorted(images.images[variant]):
            if arch not in wanted_arches:
                continue
            for entry in sorted(images.images[variant][arch], key=lambda i: str(i.path)):
                if entry.format != RAW_XZ or entry.arch != arch:
                    continue
                path = str(entry.path)
                if path in chosen or path in rejected:
                    continue  # the same file listed under two variants
                try:
                    chosen[path] = _cloud_image(entry, variant, location, compose_id, release)
                except ComposeError as exc:
                    rejected[path] = RejectedImage(path, str(exc))
    return list(chosen.values()), list(rejected.values())


def bound_images(
    data: Any, *, variants: Iterable[str], arches: Iterable[str], max_images: int
) -> tuple[Any, int]:
    """Parsed images.json cut down to what fedimg may stage, and how many entries were cut.

    productmd checks every image it reads against every other (quadratic:
    minutes for thousands), so what it is given is bounded first: only the
    wanted variants and arches, their entries whose format is raw.xz (or
    missing: productmd refuses those), and of those the first ``max_images``
    distinct paths in ``select_images``' order. ComposeError if a wanted part
    is not shaped like images.json; without a ``payload.images`` object the
    data is returned as it is, for productmd to refuse.
    """
    payload = data.get("payload") if isinstance(data, dict) else None
    if not isinstance(payload, dict) or not isinstance(payload.get("images"), dict):
        return data, 0
    found = payload["images"]
    wanted_variants, wanted_arches = set(variants), set(arches)
    kept: dict[str, dict[str, list[Any]]] = {}
    paths: set[str] = set()
    skipped = 0
    for variant in sorted(v for v in found if v in wanted_variants):
        by_arch = found[variant]
        if not isinstance(by_arch, dict):
            raise ComposeError(f"{IMAGES_JSON}: images of {variant} are not an object")
        for arch in sorted(a for a in by_arch if a in wanted_arches):
            entries = by_arch[arch]
            if not isinstance(entries, list) or not all(
                isinstance(e, dict) and isinstance(e.get("path"), str) for e in entries
            ):
                raise ComposeError(f"{IMAGES_JSON}: {variant}/{arch} is not a list of images")
            for entry in sorted(entries, key=lambda e: str(e["path"])):
                if entry.get("format", RAW_XZ) != RAW_XZ:
                    continue
                path = entry["path"]
                if path not in paths and len(paths) >= max_images:
                    skipped += 1
                    continue
                paths.add(path)
                kept.setdefault(variant, {}).setdefault(arch, []).append(entry)
    return {**data, "payload": {**payload, "images": kept}}, skipped


def too_many(skipped: int, max_images: int) -> RejectedImage:
    """The one entry standing for the ``skipped`` images beyond ``max_images``."""
    return RejectedImage(
        IMAGES_JSON,
        f"{skipped} more cloud raw.xz image(s) not staged: fedimg.compose.max_images "
        f"allows {max_images} from one compose",
    )


def _cloud_image(
    entry: productmd.images.Image, variant: str, location: str, compose_id: str, release: str
) -> CloudImage:
    path = str(entry.path)
    url = image_url(location, path)
    name = posixpath.basename(path)
    if not IMAGE_NAME_RE.match(name):
        raise ComposeError(f"image file name {name[:200]!r} is not a valid image name")
    sha256 = str(entry.checksums.get("sha256", "")).lower()
    if not SHA256_RE.match(sha256):
        raise ComposeError(f"{name}: images.json has no valid sha256 checksum")
    if entry.size <= 0:
        raise ComposeError(f"{name}: images.json size {entry.size} is not positive")
    return CloudImage(
        compose_id=compose_id,
        variant=variant,
        arch=str(entry.arch),
        subvariant=str(entry.subvariant or ""),
        format=str(entry.format),
        path=path,
        url=url,
        size=int(entry.size),
        sha256=sha256,
        image_name=name,
        type=str(entry.type),
        release=release,
    )


def check_header_version(data: Any, label: str) -> None:
    """ComposeError if ``data`` (parsed metadata JSON) has a header major version productmd lacks.

    productmd reads older formats and converts them; a newer major version
    would be read as if it were the current one. Anything else wrong with the
    header is left to productmd's own checks.
    """
    header = data.get("header") if isinstance(data, dict) else None
    version = header.get("version") if isinstance(header, dict) else None
    if not isinstance(version, str) or not re.fullmatch(r"\d{1,9}\.\d{1,9}", version):
        return
    supported = productmd.common.VERSION
    if int(version.split(".")[0]) > supported[0]:
        raise ComposeError(
            f"{label} has productmd header version {version}; the productmd fedimg uses reads "
            f"major version {supported[0]} at most (it writes {'.'.join(map(str, supported))})"
        )


def _load_json(text: str, label: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:  # json.JSONDecodeError is a ValueError too
        raise ComposeError(f"{label} is not valid JSON: {exc}") from exc


def parse_images(
    text: str, bound: Callable[[Any], tuple[Any, int]] | None = None
) -> tuple[productmd.images.Images, int]:
    """Parse images.json text with productmd; ComposeError if it is not that.

    ``bound`` (e.g. ``bound_images`` with the settings) cuts the parsed JSON
    down before productmd reads it; the int returned is what it cut.
    """
    if text.lstrip()[:1] == "<":
        raise ComposeError(f"{IMAGES_JSON} is HTML or XML, not JSON (an error page?)")
    data = _load_json(text, IMAGES_JSON)
    check_header_version(data, IMAGES_JSON)
    data, skipped = bound(data) if bound is not None else (data, 0)
    images = productmd.images.Images()
    try:
        images.deserialize(data)  # what Images.loads does after json.loads
        images.validate()
    except ValueError as exc:
        raise ComposeError(f"{IMAGES_JSON} is not valid productmd images metadata: {exc}") from exc
    except (KeyError, TypeError, AttributeError) as exc:
        raise ComposeError(
            f"{IMAGES_JSON} is not productmd images metadata: {type(exc).__name__} {exc}"
        ) from exc
    if not isinstance(images.compose.id, str) or not COMPOSE_ID_RE.match(images.compose.id):
        raise ComposeError(f"{IMAGES_JSON} has an invalid compose id {images.compose.id!r}")
    return images, skipped


def parse_composeinfo(text: str) -> productmd.composeinfo.ComposeInfo:
    """Parse composeinfo.json text with productmd; ComposeError if it is not that."""
    data = _load_json(text, COMPOSEINFO_JSON)
    check_header_version(data, COMPOSEINFO_JSON)
    info = productmd.composeinfo.ComposeInfo()
    try:
        info.deserialize(data)  # what ComposeInfo.loads does after json.loads
        info.validate()
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ComposeError(
            f"{COMPOSEINFO_JSON} is not productmd composeinfo: {type(exc).__name__} {exc}"
        ) from exc
    return info


# -- the HTTP edge ---------------------------------------------------------------


def fetch_text(
    session: requests.Session,
    url: str,
    allowed_hosts: Iterable[str] = (),
    limit: int = MAX_METADATA_BYTES,
) -> str | None:
    """GET a small text file; None on 404/410, ComposeError on anything else wrong."""
    try:
        with session.get(url, stream=True) as resp:
            if resp.status_code in (404, 410):
                return None
            if resp.status_code != 200:
                raise ComposeError(f"GET {url}: HTTP {resp.status_code}")
            # Redirects must not lead outside the allowed hosts either.
            check_http_url(resp.url or url, tuple(allowed_hosts))
            if "html" in resp.headers.get("Content-Type", "").lower():
                raise ComposeError(f"GET {url}: served as HTML, not JSON (an error page?)")
            body = bytearray()
            for chunk in resp.iter_content(_CHUNK):
                body += chunk
                if len(body) > limit:
                    raise ComposeError(f"GET {url}: larger than {limit} bytes")
    except InvalidMessage as exc:
        raise ComposeError(f"GET {url}: redirected to a place not allowed: {exc}") from exc
    except requests.RequestException as exc:
        raise ComposeError(f"GET {url}: {type(exc).__name__}: {exc}") from exc
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ComposeError(f"GET {url}: not UTF-8 text") from exc


def read_compose(
    session: requests.Session,
    location: str,
    cfg: FedimgConfig,
    expected_compose_id: str | None = None,
    release_version: str | None = None,
) -> ComposeImages:
    """The cloud raw.xz images of the compose at ``location`` (its ``compose/`` URL).

    ``expected_compose_id`` (from the pungi message) must match the metadata;
    ``release_version`` is used when composeinfo.json is absent.
    """
    try:
        check_http_url(location, tuple(cfg.allowed_hosts))
    except InvalidMessage as exc:
        raise ComposeError(f"compose location refused: {exc}") from exc
    base = location.rstrip("/")
    text = fetch_text(session, f"{base}/{IMAGES_JSON}", cfg.allowed_hosts)
    if text is None:
        raise ComposeError(f"{base}/{IMAGES_JSON} does not exist")
    images, skipped = parse_images(
        text,
        functools.partial(
            bound_images, variants=cfg.variants, arches=cfg.arches, max_images=cfg.max_images
        ),
    )
    compose_id = str(images.compose.id)
    if expected_compose_id is not None and compose_id != expected_compose_id:
        raise ComposeError(
            f"{base} holds compose {compose_id!r}, not {expected_compose_id!r} as announced"
        )
    release = _release_of(session, base, cfg, compose_id) or (release_version or "")
    selected, rejected = select_images(
        images, base, compose_id, release, variants=cfg.variants, arches=cfg.arches
    )
    if skipped:
        rejected.append(too_many(skipped, cfg.max_images))
    for bad in rejected:
        log.error("compose %s: not staging %s: %s", compose_id, bad.path[:200], bad.reason)
    log.info(
        "compose %s: %d cloud raw.xz image(s) to stage (%s), %d rejected",
        compose_id,
        len(selected),
        ", ".join(i.image_name for i in selected) or "none",
        len(rejected),
    )
    return ComposeImages(compose_id, release, selected, rejected)


def _release_of(
    session: requests.Session, base: str, cfg: FedimgConfig, compose_id: str
) -> str | None:
    """The release version from composeinfo.json, or None if it is absent or unusable."""
    try:
        text = fetch_text(session, f"{base}/{COMPOSEINFO_JSON}", cfg.allowed_hosts)
        if text is None:
            return None
        info = parse_composeinfo(text)
    except ComposeError as exc:
        log.warning("compose %s: ignoring composeinfo.json: %s", compose_id, exc)
        return None
    version: Any = info.release.version
    return str(version) if version else None
