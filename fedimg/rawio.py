"""What reading an image over HTTP shares between the streaming and the parallel readers.

The errors (``DownloadError`` and its kinds), the sha256 check, the
holding back of the last block until the download is verified, the HTTP
status check, the ``Spool`` a Range-less server's file is kept in, and the
default chunk size. ``fedimg.download`` (the probe and the streaming path)
and ``fedimg.xzparallel`` (multi-block images) both build on this module and
never on each other's internals.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator
from typing import IO, TypeVar

import requests
import urllib3.exceptions

log = logging.getLogger(__name__)

T = TypeVar("T")

SHA256_RE = re.compile(r"^[0-9a-fA-F]{64}$")
# Raw bytes per decompression step. 256 KiB stays in the CPU cache, and so costs
# less CPU than 1 MiB (benchmarks/upload.py, docs/performance.md).
DEFAULT_CHUNK = 256 * 1024


class DownloadError(Exception):
    """The image could not be downloaded as published (HTTP error, stall, truncation)."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"{url}: {reason}")
        self.url = url
        self.reason = reason


class ChecksumMismatch(DownloadError):
    """The downloaded file's sha256 is not the published one."""


class CorruptImage(DownloadError):
    """The file is not a valid xz image of the declared size."""


class ImageTooLarge(DownloadError):
    """The image's xz index claims more raw bytes than the largest volume allowed."""


def held_back(items: Iterable[T | None], verify: Callable[[], None]) -> Iterator[T | None]:
    """``items``, the last one (not None) held back until ``verify()`` returned.

    How an upload releases nothing unverified: the snapshot cannot be
    completed without its last block, and that block comes only once the
    whole download checked out (``verify`` raises otherwise). Nones (progress,
    waiting) pass at once.
    """
    held: T | None = None
    for item in items:
        if item is None:
            yield None
            continue
        if held is not None:
            yield held
        held = item
    verify()
    if held is not None:
        yield held


def check_sha256(sha256: str) -> str:
    """The hex digest, lower-cased; ValueError unless it is 64 hex characters."""
    if not isinstance(sha256, str) or not SHA256_RE.match(sha256):
        raise ValueError(f"not a hex sha256 digest: {sha256!r}")
    return sha256.lower()


class Spool:
    """A whole compressed file in an anonymous temporary file, read by offset.

    What ``probe_raw_size`` falls back to when the server ignores Range: the
    one download is written here (at most ``limit`` bytes), its index read from
    here, and ``stream_raw`` decodes from here. The file has no name, so it is
    gone once closed or once the process ends, whatever happens.
    """

    def __init__(self, file: IO[bytes], size: int) -> None:
        self.file = file
        self.size = size

    @classmethod
    def download(cls, resp: requests.Response, url: str, limit: int, log_context: str) -> Spool:
        """Write the body of the 200 answer ``resp`` to a new spool."""
        declared = int(resp.headers.get("Content-Length") or 0)
        log.warning(
            "%s: %s: the server ignored the Range request (HTTP 200): downloading the "
            "whole file (%d bytes) to a temporary file first",
            log_context,
            url,
            declared,
        )
        if declared > limit:
            raise DownloadError(url, f"{declared} bytes is more than the {limit} bytes spooled")
        file = tempfile.TemporaryFile(prefix="fedimg-spool-")
        size = 0
        try:
            for piece in resp.iter_content(1 << 20):
                size += len(piece)
                if size > limit:
                    raise DownloadError(url, f"more than the {limit} bytes spooled")
                file.write(piece)
            file.flush()
        except (requests.RequestException, OSError, urllib3.exceptions.HTTPError) as exc:
            file.close()
            raise DownloadError(
                url, f"download to a temporary file failed at {size}: {exc}"
            ) from exc
        except BaseException:
            file.close()
            raise
        return cls(file, size)

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` (safe from several threads at once)."""
        data = os.pread(self.file.fileno(), length, offset)
        while len(data) < length:
            more = os.pread(self.file.fileno(), length - len(data), offset + len(data))
            if not more:
                raise OSError(f"spool holds {self.size} bytes, read past it")
            data += more
        return data

    def close(self) -> None:
        self.file.close()


def raise_for_status(resp: requests.Response, url: str) -> None:
    if resp.status_code >= 400:
        raise DownloadError(url, f"HTTP {resp.status_code} {resp.reason}")
