"""Durable intents: a compose fedimg accepted is remembered until every image of it is done.

AWS tags record an image once its upload has started; nothing in AWS records
the images of a compose that did not start yet. So before any work starts,
accepting a compose writes ``<state_dir>/composes/<compose id>.json``
(atomically: a temporary file, fsync, rename, fsync of the folder). The
reconcile pass reads every intent and converges its compose; an intent is
dropped only when every selected image reached an end state (staged, or
given up after ``fedimg.stage.max_attempts``). A SIGKILL at any point, a
restart with no datagrepper, a lost message: the file is still there.

Updates are read-modify-write under an exclusive ``flock`` of a lock file
beside the intent, so threads and processes sharing the state directory
never lose each other's counts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from fedimg.compose import CloudImage
from fedimg.messages import COMPOSE_ID_RE

log = logging.getLogger(__name__)

VERSION: Final = 1
_IMAGE_FIELDS: Final = tuple(f.name for f in dataclasses.fields(CloudImage))


class IntentError(Exception):
    """An intent file that cannot be read or written."""


@dataclass(frozen=True)
class Intent:
    """fedimg's promise to stage a compose, as recorded on disk."""

    compose_id: str
    location: str
    release_version: str | None = None
    accepted_at: str = ""
    images: tuple[CloudImage, ...] | None = None  # None: metadata not read yet
    read_attempts: int = 0
    staged: tuple[str, ...] = ()  # sha256 of images every volume type of which is staged
    attempts: Mapping[str, int] = field(default_factory=dict)  # sha256 -> stage attempts
    given_up: Mapping[str, str] = field(default_factory=dict)  # sha256 -> reason
    last_error: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "version": VERSION,
            "compose_id": self.compose_id,
            "location": self.location,
            "release_version": self.release_version,
            "accepted_at": self.accepted_at,
            "images": None if self.images is None else [dataclasses.asdict(i) for i in self.images],
            "read_attempts": self.read_attempts,
            "staged": list(self.staged),
            "attempts": dict(self.attempts),
            "given_up": dict(self.given_up),
            "last_error": self.last_error,
        }

    @classmethod
    def from_json(cls, raw: Any) -> Intent:
        if not isinstance(raw, dict) or raw.get("version") != VERSION:
            raise IntentError(f"not a version {VERSION} intent")
        compose_id = raw.get("compose_id")
        if not isinstance(compose_id, str) or not COMPOSE_ID_RE.match(compose_id):
            raise IntentError(f"bad compose id {str(compose_id)[:80]!r}")
        images = raw.get("images")
        try:
            parsed = (
                None
                if images is None
                else tuple(CloudImage(**{k: i[k] for k in _IMAGE_FIELDS}) for i in images)
            )
            return cls(
                compose_id=compose_id,
                location=str(raw["location"]),
                release_version=raw.get("release_version"),
                accepted_at=str(raw.get("accepted_at", "")),
                images=parsed,
                read_attempts=int(raw.get("read_attempts", 0)),
                staged=tuple(str(s) for s in raw.get("staged", ())),
                attempts={str(k): int(v) for k, v in dict(raw.get("attempts", {})).items()},
                given_up={str(k): str(v) for k, v in dict(raw.get("given_up", {})).items()},
                last_error=str(raw.get("last_error", "")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise IntentError(f"{compose_id}: malformed intent: {exc}") from exc


class IntentStore:
    """Intents as JSON files under ``<state_dir>/composes``."""

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.root = Path(state_dir) / "composes"

    def check(self) -> None:
        """Create the folder and prove it is writable (called at start-up)."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.root, prefix=".probe-"):
                pass
        except OSError as exc:
            raise IntentError(f"state directory {self.root} is not writable: {exc}") from exc

    def _path(self, compose_id: str) -> Path:
        if not COMPOSE_ID_RE.match(compose_id):
            raise IntentError(f"bad compose id {compose_id[:80]!r}")
        return self.root / f"{compose_id}.json"

    @contextlib.contextmanager
    def _locked(self, compose_id: str) -> Iterator[Path]:
        path = self._path(compose_id)
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield path
        finally:
            os.close(fd)  # closing releases the flock

    def _write(self, path: Path, intent: Intent) -> None:
        data = json.dumps(intent.to_json(), indent=1, sort_keys=True).encode()
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f".{path.stem}-", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        dir_fd = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def _read(self, path: Path) -> Intent | None:
        try:
            raw = json.loads(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise IntentError(f"{path.name}: unreadable: {exc}") from exc
        return Intent.from_json(raw)

    def record(self, intent: Intent) -> Intent:
        """Write ``intent`` unless one exists for the compose; return the one on disk."""
        with self._locked(intent.compose_id) as path:
            found = self._read(path)
            if found is not None:
                return found
            self._write(path, intent)
            return intent

    def get(self, compose_id: str) -> Intent | None:
        with self._locked(compose_id) as path:
            return self._read(path)

    def update(self, compose_id: str, change: Callable[[Intent], Intent]) -> Intent | None:
        """Apply ``change`` to the intent on disk (None if there is none any more)."""
        with self._locked(compose_id) as path:
            found = self._read(path)
            if found is None:
                return None
            updated = change(found)
            if updated != found:
                self._write(path, updated)
            return updated

    def drop(self, compose_id: str) -> bool:
        with self._locked(compose_id) as path:
            try:
                path.unlink()
            except FileNotFoundError:
                return False
        with contextlib.suppress(OSError):
            path.with_suffix(".lock").unlink()
        return True

    def compose_ids(self) -> list[str]:
        """Every compose with an intent, oldest file first."""
        if not self.root.is_dir():
            return []
        files = [p for p in self.root.glob("*.json") if not p.name.startswith(".")]
        files.sort(key=lambda p: (p.stat().st_mtime, p.name))
        return [p.stem for p in files if COMPOSE_ID_RE.match(p.stem)]
