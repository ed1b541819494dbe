"""fedimg stage's actuator: upload an image into a snapshot, register its AMIs, announce them.

``fedimg.engine`` decides (``fedimg.plan``) and calls ``Stager`` for each step:

* ``stage``: announce ``fedimg.image.upload`` started, take the trusted
  snapshot the plan chose or stream the image into a new one (download,
  verify, decompress, EBS direct APIs), register one AMI per volume type,
  tagged ``fedimg:state=testing``, wait until it is available, and announce
  ``fedimg.image.upload`` completed and ``fedimg.image.test`` started (the
  request for autocloud_ami) -- or ``fedimg.image.upload`` failed with the
  reason, leaving no half-registered AMI and no orphan snapshot behind;
* ``announce``: an AMI that exists is announced again (a replay re-requests
  its test while it is ``testing``);
* ``adopt``, ``deregister``, ``delete_snapshot``, ``mark_resumed``: what a
  crash left behind.

Progress of uploads goes to the log, or to one bar per image on a terminal
(``TerminalBoard``). Every log line names the compose and the image (and
the AMI once known).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import shutil
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Any, Final, Literal, Protocol

import requests
from botocore.exceptions import BotoCoreError, ClientError

from fedimg import ami, tags
from fedimg.aws import AwsClients, error_code, with_extra
from fedimg.compose import CloudImage, ComposeError
from fedimg.config import FedimgConfig
from fedimg.download import DownloadError, probe_raw_size, stream_raw
from fedimg.http import make_session
from fedimg.messages import (
    IMAGE_TEST,
    IMAGE_UPLOAD,
    Emitter,
    InvalidMessage,
    MessageType,
    StagedImage,
    image_event,
)
from fedimg.snapshot import SnapshotError, delete_snapshot_quietly, upload_snapshot

log = logging.getLogger(__name__)

AVAILABLE_TIMEOUT: Final = 1800.0
AVAILABLE_POLL: Final = 5.0
REASON_MAX: Final = 1000

Status = Literal["staged", "existing", "failed", "busy", "waiting"]


# -- outcomes ---------------------------------------------------------------------


@dataclass(frozen=True)
class StageOutcome:
    """What became of one image and volume type (``image_name`` is the file name)."""

    image_name: str
    vol_type: str
    ami_id: str | None
    status: Status
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.status != "failed"


def failure_reason(exc: BaseException) -> str:
    """A one-line reason for a message body and a log line (never a traceback)."""
    if isinstance(exc, ClientError):
        text = f"AWS {error_code(exc) or 'error'}: {exc}"
    elif isinstance(exc, DownloadError | SnapshotError | ami.AmiError | ComposeError):
        text = str(exc)
    else:
        text = f"{type(exc).__name__}: {exc}"
    return " ".join(text.split())[:REASON_MAX]


# Failures that are the world's fault (bad input, AWS refusing): one ERROR line.
EXPECTED_FAILURES: Final = (
    DownloadError,
    SnapshotError,
    ami.AmiError,
    ClientError,
    BotoCoreError,
    ComposeError,
    InvalidMessage,
    ValueError,
)


# -- progress ---------------------------------------------------------------------


class Progress(Protocol):
    """Progress of one image's upload, in raw bytes read from the download."""

    def update(self, done: int) -> None: ...
    def close(self, outcome: str) -> None: ...


ProgressFactory = Callable[[str, int], Progress]
"""``factory(label, total_raw_bytes) -> Progress``; one per uploaded image."""


class LogProgress:
    """Plain log lines: one at every ``step`` percent (for the hub and non-TTY runs)."""

    def __init__(self, label: str, total: int, step: int = 10) -> None:
        self.label = label
        self.total = max(total, 1)
        self.step = step
        self.started = time.monotonic()
        self._next = step

    def update(self, done: int) -> None:
        pct = done * 100 // self.total
        if pct < self._next:
            return
        self._next = (pct // self.step + 1) * self.step
        elapsed = max(time.monotonic() - self.started, 1e-6)
        log.info(
            "%s: %d%% (%d of %d MiB raw, %.1f MiB/s)",
            self.label,
            pct,
            done >> 20,
            self.total >> 20,
            done / elapsed / 2**20,
        )

    def close(self, outcome: str) -> None:
        log.debug("%s: upload %s", self.label, outcome)


class TerminalBoard:
    """One progress line per image on a terminal, redrawn in place (stdlib only).

    Call it as a ProgressFactory. While ``attached``, log records written to
    the same terminal go above the bars instead of through them.
    """

    def __init__(self, stream: IO[str] | None = None, min_interval: float = 0.1) -> None:
        self.stream: IO[str] = stream or sys.stderr
        self.min_interval = min_interval
        self._lock = threading.RLock()
        self._bars: list[_Bar] = []
        self._drawn = 0
        self._last = 0.0

    def __call__(self, label: str, total: int) -> Progress:
        bar = _Bar(self, label, max(total, 1))
        with self._lock:
            self._bars.append(bar)
            self._draw(force=True)
        return bar

    def _line(self, bar: _Bar, width: int) -> str:
        frac = min(bar.done / bar.total, 1.0)
        elapsed = max((bar.finished or time.monotonic()) - bar.started, 1e-6)
        tail = (
            f" {frac * 100:5.1f}% {bar.done >> 20}/{bar.total >> 20} MiB"
            f" {bar.done / elapsed / 2**20:6.1f} MiB/s"
        )
        if bar.outcome:
            tail += f" {bar.outcome}"
        cells = 20
        filled = int(frac * cells)
        gauge = "[" + "#" * filled + "-" * (cells - filled) + "]"
        room = max(width - len(gauge) - len(tail) - 2, 10)
        label = bar.label if len(bar.label) <= room else "..." + bar.label[-(room - 3) :]
        return f"{label:<{room}} {gauge}{tail}"[: width - 1]

    def _draw(self, force: bool = False) -> None:
        with self._lock:
            now = time.monotonic()
            if not force and now - self._last < self.min_interval:
                return
            self._last = now
            width = shutil.get_terminal_size((100, 24)).columns
            out = [f"\x1b[{self._drawn}A"] if self._drawn else []
            out += ["\r" + self._line(bar, width) + "\x1b[K\n" for bar in self._bars]
            self.stream.write("".join(out))
            self.stream.flush()
            self._drawn = len(self._bars)

    def _erase(self) -> None:
        if self._drawn:
            self.stream.write(f"\x1b[{self._drawn}A\r\x1b[J")
            self._drawn = 0

    def write_above(self, text: str) -> None:
        """Write ``text`` (log output) above the bars, then redraw them."""
        with self._lock:
            self._erase()
            self.stream.write(text)
            if text.endswith("\n") and self._bars:
                self._draw(force=True)

    @contextlib.contextmanager
    def attached(self) -> Iterator[TerminalBoard]:
        """Route the root logger's stream handlers on this terminal through the board."""
        proxy = _AboveBars(self)
        swapped: list[tuple[logging.StreamHandler[Any], IO[str]]] = []
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream is self.stream:
                swapped.append((handler, handler.stream))
                handler.setStream(proxy)
        try:
            yield self
        finally:
            for handler, stream in swapped:
                handler.setStream(stream)
            with self._lock:
                self._draw(force=True)


class _AboveBars:
    """A text stream writing through ``TerminalBoard.write_above``."""

    def __init__(self, board: TerminalBoard) -> None:
        self.board = board

    def write(self, text: str) -> int:
        self.board.write_above(text)
        return len(text)

    def flush(self) -> None:
        self.board.stream.flush()


class _Bar:
    def __init__(self, board: TerminalBoard, label: str, total: int) -> None:
        self.board = board
        self.label = label
        self.total = total
        self.done = 0
        self.outcome = ""
        self.started = time.monotonic()
        self.finished: float | None = None

    def update(self, done: int) -> None:
        self.done = done
        self.board._draw()

    def close(self, outcome: str) -> None:
        self.outcome = outcome
        self.finished = time.monotonic()
        if outcome == "done":
            self.done = self.total
        self.board._draw(force=True)


# -- the stager: stage's actuator -------------------------------------------------------


def _utcnow() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Stager:
    """Carries out stage's actions in ``cfg.staging_region``; ``fedimg.engine`` decides which.

    Every method is one step of ``fedimg.plan`` (adopt, announce, stage from a
    trusted snapshot or a new upload, deregister, delete) and emits the
    messages of that step. Safe to call from several threads for different images.
    """

    def __init__(
        self,
        cfg: FedimgConfig,
        emitter: Emitter,
        aws: AwsClients,
        session: requests.Session,
        *,
        progress: ProgressFactory | None = None,
        available_timeout: float = AVAILABLE_TIMEOUT,
        poll_interval: float = AVAILABLE_POLL,
        clock: Callable[[], str] = _utcnow,
    ) -> None:
        self.cfg = cfg
        self.emitter = emitter
        self.aws = aws
        self.session = session
        self.progress: ProgressFactory = progress or LogProgress
        self.available_timeout = available_timeout
        self.poll_interval = poll_interval
        self.clock = clock
        self.region = cfg.staging_region

    @classmethod
    def from_config(
        cls,
        cfg: FedimgConfig,
        emitter: Emitter,
        aws: AwsClients | None = None,
        session: requests.Session | None = None,
        progress: ProgressFactory | None = None,
    ) -> Stager:
        return cls(
            cfg,
            emitter,
            aws or AwsClients(max_attempts=cfg.aws_max_attempts),
            session
            or make_session(cfg.http_retries, cfg.http_timeout, allowed_hosts=cfg.allowed_hosts),
            progress=progress,
        )

    @property
    def ec2(self) -> Any:
        return self.aws.ec2(self.region)

    def staged(self, image: CloudImage, vol_type: str, ami_id: str | None = None) -> StagedImage:
        return StagedImage(
            compose_id=image.compose_id,
            image_name=image.image_name,
            image_url=image.url,
            architecture=image.arch,
            region=self.region,
            ami_id=ami_id,
            vol_type=vol_type,
            subvariant=image.subvariant,
            release=image.release,
            sha256=image.sha256,
        )

    def image_tags(self, staged: StagedImage, staged_at: str) -> dict[str, str]:
        """The tags of a new ``testing`` AMI and its snapshot: fedimg's and the extra ones."""
        return with_extra(
            tags.image_tags(staged, tags.State.TESTING, staged_at), self.cfg.extra_tags
        )

    # -- the steps -----------------------------------------------------------------------
    def adopt(self, image: CloudImage, vol: str, ami_id: str, ctx: str) -> None:
        """Tag an AMI a crash left untagged (registered, never tagged) as ``testing``."""
        described = ami.describe_image(self.ec2, ami_id) or {}
        wanted = self.image_tags(self.staged(image, vol, ami_id), self.clock())
        ami.ensure_tags(self.ec2, ami_id, wanted, described.get("Tags"))
        log.warning("%s: AMI %s (%s) was never tagged; adopted as testing", ctx, ami_id, vol)

    def announce(
        self, image: CloudImage, vol: str, ami_id: str, request_test: bool, ctx: str
    ) -> StageOutcome:
        """The AMI exists: upload completed (once available), and its test if it is testing."""
        staged = self.staged(image, vol, ami_id)
        log.info("%s: AMI %s (%s) already exists", ctx, ami_id, vol)
        try:
            described = ami.describe_image(self.ec2, ami_id) or {}
            if described.get("State") != "available":
                ami.wait_available(self.ec2, ami_id, self.available_timeout, self.poll_interval)
        except EXPECTED_FAILURES as exc:
            reason = failure_reason(exc)
            log.error("%s: AMI %s: not usable: %s", ctx, ami_id, reason)
            self._emit(IMAGE_UPLOAD, staged, "failed", ctx, reason)
            return StageOutcome(image.image_name, vol, ami_id, "failed", reason)
        self._emit(IMAGE_UPLOAD, staged, "completed", ctx)
        if request_test:
            self._emit(IMAGE_TEST, staged, "started", ctx)
        else:
            log.info("%s: AMI %s is past testing, not asking for a test again", ctx, ami_id)
        return StageOutcome(image.image_name, vol, ami_id, "existing")

    def deregister(self, ami_id: str, reason: str, ctx: str) -> None:
        log.warning("%s: deregistering AMI %s: %s", ctx, ami_id, reason)
        ami.deregister_quietly(self.ec2, ami_id, ctx)

    def delete_snapshot(self, snapshot_id: str, reason: str, ctx: str) -> None:
        try:
            self.ec2.delete_snapshot(SnapshotId=snapshot_id)
        except ClientError as exc:
            if error_code(exc) == "InvalidSnapshot.NotFound":
                return
            if error_code(exc) == "InvalidSnapshot.InUse":
                log.warning("%s: snapshot %s is in use; kept", ctx, snapshot_id)
                return
            raise
        log.warning("%s: deleted snapshot %s (%s)", ctx, snapshot_id, reason)

    def mark_resumed(self, snapshot_id: str, count: int, ctx: str) -> None:
        self.ec2.create_tags(Resources=[snapshot_id], Tags=tags.as_list({tags.RESUMED: str(count)}))
        log.warning("%s: staging again from snapshot %s (resume %d)", ctx, snapshot_id, count)

    def fail(
        self, image: CloudImage, vols: Iterable[str], reason: str, ctx: str
    ) -> dict[str, StageOutcome]:
        """Announce ``fedimg.image.upload`` failed for these volume types (outcomes by type)."""
        outcomes = {}
        for vol in vols:
            self._emit(IMAGE_UPLOAD, self.staged(image, vol), "failed", ctx, reason)
            outcomes[vol] = StageOutcome(image.image_name, vol, None, "failed", reason)
        return outcomes

    def stage(
        self,
        image: CloudImage,
        vols: Sequence[str],
        resume_from: str | None,
        ctx: str,
        *,
        has_ami: bool = False,
    ) -> dict[str, StageOutcome]:
        """Register an AMI per volume type in ``vols``: from ``resume_from`` or a new upload."""
        try:
            return self._create(image, list(vols), resume_from, has_ami, ctx)
        except EXPECTED_FAILURES as exc:
            reason = failure_reason(exc)
            log.error("%s: staging failed: %s", ctx, reason)
        except Exception as exc:
            reason = failure_reason(exc)
            log.exception("%s: staging failed unexpectedly", ctx)
        return self.fail(image, vols, reason, ctx)

    def _create(
        self, image: CloudImage, vols: list[str], resume_from: str | None, has_ami: bool, ctx: str
    ) -> dict[str, StageOutcome]:
        ec2 = self.ec2
        staged_at = self.clock()
        for vol in vols:
            self._emit(IMAGE_UPLOAD, self.staged(image, vol), "started", ctx)
        snap_tags = ami.snapshot_tags(self.image_tags(self.staged(image, vols[0]), staged_at))
        try:
            snapshot_id, size_gib, created = self._snapshot(ec2, image, snap_tags, resume_from, ctx)
        except EXPECTED_FAILURES as exc:
            reason = failure_reason(exc)
            log.error("%s: no snapshot: %s", ctx, reason)
            for vol in vols:
                self._emit(IMAGE_UPLOAD, self.staged(image, vol), "failed", ctx, reason)
            return {v: StageOutcome(image.image_name, v, None, "failed", reason) for v in vols}
        outcomes: dict[str, StageOutcome] = {}

        def drop_unused_snapshot() -> None:
            # A snapshot this run made that no AMI uses must not be left behind.
            # One an earlier run left is kept: it may back AMIs of other volume types.
            if created and not has_ami and not any(o.ami_id for o in outcomes.values()):
                log.warning("%s: deleting snapshot %s, no AMI uses it", ctx, snapshot_id)
                delete_snapshot_quietly(ec2, snapshot_id, ctx)

        # An interruption (KeyboardInterrupt, a killed process) keeps the tagged
        # snapshot on purpose: the next run resumes from it.
        try:
            for vol in vols:
                outcomes[vol] = self._register(
                    ec2,
                    image,
                    vol,
                    snapshot_id=snapshot_id,
                    size_gib=size_gib,
                    staged_at=staged_at,
                    ctx=ctx,
                )
        except Exception:
            drop_unused_snapshot()
            raise
        drop_unused_snapshot()
        return outcomes

    def _snapshot(
        self,
        ec2: Any,
        image: CloudImage,
        snap_tags: dict[str, str],
        resume_from: str | None,
        ctx: str,
    ) -> tuple[str, int, bool]:
        """(snapshot id, GiB, made now): the trusted one the plan chose, else a new upload."""
        if resume_from is not None:
            found = ec2.describe_snapshots(SnapshotIds=[resume_from])["Snapshots"][0]
            log.info("%s: registering from snapshot %s of an earlier run", ctx, resume_from)
            return resume_from, int(found["VolumeSize"]), False
        raw_size = probe_raw_size(
            self.session, image.url, log_context=ctx, max_raw_gib=self.cfg.max_volume_gib
        )
        progress = self.progress(ctx, raw_size)
        raw = stream_raw(
            self.session,
            image.url,
            image.sha256,
            raw_size,
            log_context=ctx,
            blocks_in_flight=self.cfg.xz_blocks_in_flight,
        )
        try:
            upload = upload_snapshot(
                self.aws.ebs(self.region),
                ec2,
                raw,
                raw_size,
                workers=self.cfg.upload_workers,
                description=f"fedimg {image.compose_id} {image.image_name}"[:255],
                tags=snap_tags,
                # Fresh per attempt: it only makes botocore's retries of this call idempotent.
                client_token=uuid.uuid4().hex,
                progress=progress.update,
                log_context=ctx,
            )
        except BaseException:
            progress.close("failed")
            raise
        progress.close("done")
        try:
            # The sha256 tag is what lets a crashed run resume from this snapshot,
            # and fedimg:uploaded says every block is in it (set only from here).
            described = ec2.describe_snapshots(SnapshotIds=[upload.snapshot_id])["Snapshots"]
            done = {**snap_tags, tags.UPLOADED: self.clock()}
            ami.ensure_tags(ec2, upload.snapshot_id, done, described[0].get("Tags"))
        except Exception:
            delete_snapshot_quietly(ec2, upload.snapshot_id, ctx)
            raise
        log.info(
            "%s: snapshot %s: %d GiB, %d of %d blocks sent",
            ctx,
            upload.snapshot_id,
            upload.volume_size_gib,
            upload.blocks_sent,
            upload.blocks_total,
        )
        return upload.snapshot_id, upload.volume_size_gib, True

    def _register(
        self,
        ec2: Any,
        image: CloudImage,
        vol: str,
        *,
        snapshot_id: str,
        size_gib: int,
        staged_at: str,
        ctx: str,
    ) -> StageOutcome:
        staged = self.staged(image, vol)
        params = ami.register_params(
            image,
            snapshot_id,
            vol,
            size_gib,
            description=ami.ami_description(image, vol),
            tags=tags.as_list(self.image_tags(staged, staged_at)),
        )
        ami_id: str | None = None
        try:
            ami_id = ami.register(ec2, params, log_context=ctx)
            ami.wait_available(ec2, ami_id, self.available_timeout, self.poll_interval)
        except EXPECTED_FAILURES as exc:
            reason = failure_reason(exc)
            log.error("%s: AMI %s (%s) failed: %s", ctx, ami_id or "-", vol, reason)
            if ami_id is not None and not isinstance(exc, ami.AmiTimeout):
                ami.deregister_quietly(ec2, ami_id, ctx)  # failed for good: do not leave it
                ami_id = None
            self._emit(
                IMAGE_UPLOAD, dataclasses.replace(staged, ami_id=ami_id), "failed", ctx, reason
            )
            return StageOutcome(image.image_name, vol, ami_id, "failed", reason)
        staged = dataclasses.replace(staged, ami_id=ami_id)
        log.info("%s: AMI %s (%s) available in %s", ctx, ami_id, vol, self.region)
        self._emit(IMAGE_UPLOAD, staged, "completed", ctx)
        self._emit(IMAGE_TEST, staged, "started", ctx)
        return StageOutcome(image.image_name, vol, ami_id, "staged")

    def _emit(
        self,
        mtype: MessageType,
        staged: StagedImage,
        status: str,
        ctx: str,
        reason: str | None = None,
    ) -> None:
        """Publish; a bus failure is logged and never stops the work."""
        try:
            self.emitter.emit(mtype, image_event(staged, status, reason))
        except Exception:
            log.exception("%s: could not publish %s %s", ctx, mtype, status)
