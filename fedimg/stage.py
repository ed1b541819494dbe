"""fedimg stage: from a finished compose to candidate AMIs in the staging region.

``Stager.stage_compose`` is what the hub's ``StageConsumer`` calls for a
FINISHED (or FINISHED_INCOMPLETE) compose and ``cli_stage`` what
``fedimg stage --compose-location URL`` calls; both do the same, messages
included. For every cloud raw.xz image of the compose, concurrently in a
bounded pool (``fedimg.stage.workers``), and for every configured volume type:

1. find the AMI by its deterministic name (or its fedimg tags): if it exists,
   re-announce it (``fedimg.image.upload`` completed, and ``fedimg.image.test``
   started while it is still ``testing``) instead of uploading again;
2. else announce ``fedimg.image.upload`` started, take the completed snapshot
   an interrupted earlier run left (found by its sha256 tag) or stream the
   image into a new one (download, verify, decompress, EBS direct APIs),
   register one AMI per volume type from it, tag AMI and snapshot
   (``fedimg:state=testing``), wait until the AMI is available, and announce
   ``fedimg.image.upload`` completed and ``fedimg.image.test`` started (the
   request for autocloud_ami) -- or ``fedimg.image.upload`` failed with the
   reason, leaving no half-registered AMI and no orphan snapshot behind.

One image's failure never stops the others. Every log line names the compose
and the image (and the AMI once known).
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
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import IO, Any, Final, Literal, Protocol

import requests
from botocore.exceptions import BotoCoreError, ClientError

from fedimg import ami, tags
from fedimg.aws import AwsClients, error_code
from fedimg.compose import CloudImage, ComposeError, read_compose
from fedimg.config import FedimgConfig
from fedimg.download import DownloadError, probe_raw_size, stream_raw
from fedimg.http import make_session
from fedimg.messages import (
    IMAGE_TEST,
    IMAGE_UPLOAD,
    ComposeStatus,
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
COMPOSE_LABEL: Final = "metadata/images.json"
REASON_MAX: Final = 1000

Status = Literal["staged", "existing", "failed"]


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


# -- the stager ---------------------------------------------------------------------


def _utcnow() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Stager:
    """Stages compose images in ``cfg.staging_region``; safe to call from several threads."""

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
        # One pool for every compose this process stages: the bound is global.
        self._pool = ThreadPoolExecutor(cfg.stage_workers, thread_name_prefix="fedimg-stage")
        self._locks_guard = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}
        self._queued: set[str] = set()  # sha256 of images submitted and not finished

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

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    # -- entry points -----------------------------------------------------------
    def stage_compose(self, status: ComposeStatus) -> list[StageOutcome]:
        """Stage a compose announced by pungi (other statuses are ignored)."""
        if not status.finished or not status.location:
            log.info("compose %s: status %s, nothing to stage", status.compose_id, status.status)
            return []
        return self.stage_location(status.location, status.compose_id, status.release_version)

    def stage_location(
        self, location: str, compose_id: str | None = None, release_version: str | None = None
    ) -> list[StageOutcome]:
        """Stage every cloud image of the compose at ``location``; one outcome per AMI."""
        who = compose_id or location
        try:
            found = read_compose(self.session, location, self.cfg, compose_id, release_version)
        except ComposeError as exc:
            log.error("compose %s: cannot read the compose: %s", who, exc)
            return [StageOutcome(COMPOSE_LABEL, "", None, "failed", failure_reason(exc))]
        outcomes = [
            StageOutcome(bad.image_name, vol, None, "failed", bad.reason)
            for bad in found.rejected
            for vol in self.cfg.volume_types
        ]
        if not found.images:
            log.info("compose %s: no cloud raw.xz image to stage, skipped", found.compose_id)
            return outcomes
        futures: list[Future[list[StageOutcome]]] = [
            self._pool.submit(self._tracked, image) for image in found.images
        ]
        wait(futures)
        for future in futures:
            outcomes.extend(future.result())
        staged = sum(o.ok for o in outcomes)
        log.info(
            "compose %s: %d of %d AMI(s) staged or found in %s",
            found.compose_id,
            staged,
            len(outcomes),
            self.region,
        )
        return outcomes

    def submit_image(self, image: CloudImage) -> Future[list[StageOutcome]] | None:
        """Stage one image in the pool (the reconcile pass resuming a crashed stage).

        None if this process is already staging or about to stage that image.
        """
        with self._locks_guard:
            if image.sha256 in self._queued:
                return None
            self._queued.add(image.sha256)
        try:
            return self._pool.submit(self._run_tracked, image)
        except BaseException:
            with self._locks_guard:
                self._queued.discard(image.sha256)
            raise

    def busy(self, sha256: str) -> bool:
        """Whether this process is staging (or has queued) the image with this sha256."""
        with self._locks_guard:
            lock = self._locks.get(sha256)
            return sha256 in self._queued or (lock is not None and lock.locked())

    def _tracked(self, image: CloudImage) -> list[StageOutcome]:
        with self._locks_guard:
            self._queued.add(image.sha256)
        return self._run_tracked(image)

    def _run_tracked(self, image: CloudImage) -> list[StageOutcome]:
        try:
            return self.stage_image(image)
        finally:
            with self._locks_guard:
                self._queued.discard(image.sha256)

    # -- one image --------------------------------------------------------------
    def _image_lock(self, key: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(key, threading.Lock())

    def stage_image(self, image: CloudImage) -> list[StageOutcome]:
        """Stage one image for every volume type; never raises for an expected failure."""
        ctx = f"compose {image.compose_id} image {image.image_name}"
        # The same image staged twice at once (a replay during the first run)
        # waits for the first, then finds its AMIs.
        with self._image_lock(image.sha256):
            try:
                return self._stage_image(image, ctx)
            except EXPECTED_FAILURES as exc:
                reason = failure_reason(exc)
                log.error("%s: staging failed: %s", ctx, reason)
            except Exception as exc:
                reason = failure_reason(exc)
                log.exception("%s: staging failed unexpectedly", ctx)
        for vol in self.cfg.volume_types:
            self._emit(IMAGE_UPLOAD, self._staged(image, vol), "failed", ctx, reason)
        return [
            StageOutcome(image.image_name, vol, None, "failed", reason)
            for vol in self.cfg.volume_types
        ]

    def _staged(self, image: CloudImage, vol_type: str, ami_id: str | None = None) -> StagedImage:
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

    def _stage_image(self, image: CloudImage, ctx: str) -> list[StageOutcome]:
        ec2 = self.aws.ec2(self.region)
        outcomes: dict[str, StageOutcome] = {}
        missing: list[str] = []
        for vol in self.cfg.volume_types:
            existing = self._find_existing(ec2, image, vol, ctx)
            if existing is None:
                missing.append(vol)
            else:
                outcomes[vol] = self._announce_existing(ec2, image, vol, existing, ctx)
        if missing:
            has_ami = any(o.ami_id for o in outcomes.values())
            outcomes.update(self._create(ec2, image, missing, has_ami, ctx))
        return [outcomes[vol] for vol in self.cfg.volume_types]

    def _find_existing(
        self, ec2: Any, image: CloudImage, vol: str, ctx: str
    ) -> dict[str, Any] | None:
        found = ami.find_ami(ec2, ami.ami_name(image, vol), image.sha256, vol)
        if found is None:
            return None
        if str(found.get("State")) in ami.BROKEN_STATES:
            log.warning(
                "%s: AMI %s is %s; deregistering it to stage anew",
                ctx,
                found["ImageId"],
                found.get("State"),
            )
            ami.deregister_quietly(ec2, str(found["ImageId"]), ctx)
            return None
        return found

    def _announce_existing(
        self, ec2: Any, image: CloudImage, vol: str, found: dict[str, Any], ctx: str
    ) -> StageOutcome:
        ami_id = str(found["ImageId"])
        staged = self._staged(image, vol, ami_id)
        state = tags.state_of(found)
        if state is None:  # registered, but the run died before tagging it
            wanted = tags.image_tags(staged, tags.State.TESTING, self.clock())
            ami.ensure_tags(ec2, ami_id, wanted, found.get("Tags"))
            state = tags.State.TESTING
        log.info("%s: AMI %s (%s) already exists, state %s", ctx, ami_id, vol, state)
        try:
            if found.get("State") != "available":
                ami.wait_available(ec2, ami_id, self.available_timeout, self.poll_interval)
        except EXPECTED_FAILURES as exc:
            reason = failure_reason(exc)
            log.error("%s: AMI %s: not usable: %s", ctx, ami_id, reason)
            self._emit(IMAGE_UPLOAD, staged, "failed", ctx, reason)
            return StageOutcome(image.image_name, vol, ami_id, "failed", reason)
        self._emit(IMAGE_UPLOAD, staged, "completed", ctx)
        if state is tags.State.TESTING:
            self._emit(IMAGE_TEST, staged, "started", ctx)
        else:
            log.info("%s: AMI %s is %s, not asking for a test again", ctx, ami_id, state)
        return StageOutcome(image.image_name, vol, ami_id, "existing")

    def _create(
        self, ec2: Any, image: CloudImage, vols: list[str], has_ami: bool, ctx: str
    ) -> dict[str, StageOutcome]:
        staged_at = self.clock()
        for vol in vols:
            self._emit(IMAGE_UPLOAD, self._staged(image, vol), "started", ctx)
        snap_tags = ami.snapshot_tags(
            tags.image_tags(self._staged(image, vols[0]), tags.State.TESTING, staged_at)
        )
        try:
            snapshot_id, size_gib, created = self._snapshot(ec2, image, snap_tags, ctx)
        except EXPECTED_FAILURES as exc:
            reason = failure_reason(exc)
            log.error("%s: no snapshot: %s", ctx, reason)
            for vol in vols:
                self._emit(IMAGE_UPLOAD, self._staged(image, vol), "failed", ctx, reason)
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
        self, ec2: Any, image: CloudImage, snap_tags: dict[str, str], ctx: str
    ) -> tuple[str, int, bool]:
        """(snapshot id, GiB, made now): one an earlier run left (completed), else a new upload."""
        found = ami.find_snapshot(ec2, image.sha256)
        if found is not None and tags.UPLOADED not in tags.as_dict(found.get("Tags")):
            # Completed by EC2 but never marked by us (moto reports a half-written
            # EBS-direct snapshot as completed): not trusted; reconcile deletes it.
            log.warning(
                "%s: snapshot %s lacks %s; not resuming from it",
                ctx,
                found["SnapshotId"],
                tags.UPLOADED,
            )
            found = None
        if found is not None:
            log.info(
                "%s: resuming from completed snapshot %s of an earlier run",
                ctx,
                found["SnapshotId"],
            )
            return str(found["SnapshotId"]), int(found["VolumeSize"]), False
        raw_size = probe_raw_size(
            self.session, image.url, log_context=ctx, max_raw_gib=self.cfg.max_volume_gib
        )
        progress = self.progress(ctx, raw_size)
        raw = stream_raw(self.session, image.url, image.sha256, raw_size, log_context=ctx)
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
        staged = self._staged(image, vol)
        params = ami.register_params(
            image,
            snapshot_id,
            vol,
            size_gib,
            description=ami.ami_description(image, vol),
            tags=tags.as_list(tags.image_tags(staged, tags.State.TESTING, staged_at)),
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


# -- the CLI ---------------------------------------------------------------------------


def cli_stage(
    cfg: FedimgConfig, emitter: Emitter, location: str, compose_id: str | None = None
) -> int:
    """``fedimg stage --compose-location URL``: 0 if every image was staged or found."""
    board = TerminalBoard() if sys.stderr.isatty() else None
    stager = Stager.from_config(cfg, emitter, progress=board)
    try:
        with board.attached() if board is not None else contextlib.nullcontext():
            outcomes = stager.stage_location(location, compose_id)
    finally:
        stager.close()
    who = compose_id or location
    for o in outcomes:
        log.info(
            "compose %s: %s %s %s: %s%s",
            who,
            o.image_name,
            o.vol_type or "-",
            o.ami_id or "-",
            o.status,
            f" ({o.reason})" if o.reason else "",
        )
    failed = [o for o in outcomes if not o.ok]
    if failed:
        log.error("compose %s: %d of %d AMI(s) failed", who, len(failed), len(outcomes))
        return 1
    return 0
