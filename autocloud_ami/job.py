"""One AMI test run, end to end: ``test_ami(request, deps) -> JobResult``.

    queued -> (a free slot) -> running -> per scenario, all at once:
              instance type -> instance -> SSH -> suite -> cleanup
           -> every result to ResultsDB (tests, then the summaries) -> success | failed

A scenario is one instance type of ``autocloud_ami.scenarios`` for the AMI's
architecture (``x86_64:t3.small``); each runs on its own instance, key pair
and security group, named after its own job id (the run's, plus the type when
there are several). An instance type the region does not offer, of another
architecture, unknown, or refused by ``run_instances`` (Unsupported,
InvalidParameterValue, no capacity) is not the image's fault: that scenario's
results are NEEDS_INSPECTION with the reason.

``Deps`` bundles the seams (AWS clients, the ResultsDB reporter, the message
emitter, the SSH session factory, the output store), so tests swap any of
them. The consumer and ``autocloud-ami test`` call exactly this function.

Whatever else goes wrong once the request is accepted - the AMI missing or
not available, run_instances refused (a quota), the instance never running,
SSH never answering, a wrong host key, a bug - every applicable test of that
scenario is reported FAILED with a note saying why, its summary is FAILED,
the instance is cleaned up and ``autocloud.ami.failed`` is emitted. Only a malformed request
(``InvalidRequest``: no AMI id, a bad id, a region or architecture this
runner does not test) is refused before any AWS call, with no result and no
message.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import paramiko

from autocloud_ami.config import AutocloudConfig
from autocloud_ami.instance import (
    InstanceError,
    TestInstance,
    Timeouts,
    TypeUnavailable,
    describe_type,
    launch_spec,
    new_job_id,
    wait_for_ssh_port,
)
from autocloud_ami.report import (
    NEEDS_INSPECTION,
    PASSED,
    Delivery,
    OutputStore,
    Result,
    ResultsReporter,
    build_results,
    make_reporter,
    outcome_name,
    summary_of,
)
from autocloud_ami.runner import SuiteReport, TestOutcome, detect_family, not_run, run_suite
from autocloud_ami.ssh import CommandResult, ParamikoSession, SshError
from autocloud_ami.suite import SUITE, Check, Family, family_for
from fedimg.aws import AwsClients
from fedimg.messages import (
    AMI_FAILED,
    AMI_ID_RE,
    AMI_QUEUED,
    AMI_RUNNING,
    AMI_SUCCESS,
    FAILED,
    IMAGE_TEST,
    REGION_RE,
    AmiTestEvent,
    Emitter,
    InvalidMessage,
    MessageType,
    StagedImage,
    parse_image_event,
    scenario_name,
)

log = logging.getLogger(__name__)


class InvalidRequest(ValueError):
    """A test request this runner refuses before touching AWS."""


class QueueTimeout(TimeoutError):
    """No test slot became free before ``autocloud_ami.queue_timeout``."""


# -- seams ------------------------------------------------------------------------


@dataclass(frozen=True)
class SshTarget:
    """Where and as whom to log in; the key is never shown."""

    host: str
    port: int
    user: str
    key: paramiko.PKey = field(repr=False)
    fingerprints: tuple[str, ...] | None = None


class Session(Protocol):
    """An ``ssh.SshSession`` that can also make its first login."""

    def connect(self, timeout: float) -> None: ...
    def run(self, command: str, timeout: float) -> CommandResult: ...
    def reconnect(self, timeout: float) -> None: ...
    def close(self) -> None: ...


SessionFactory = Callable[[SshTarget], Session]


def paramiko_session(target: SshTarget) -> Session:
    """Production factory: paramiko, host key checked against the console's fingerprints."""
    return ParamikoSession(
        target.host,
        target.port,
        target.user,
        target.key,
        expected_fingerprints=frozenset(target.fingerprints) if target.fingerprints else None,
    )


PortProbe = Callable[[str, int, float], object]
"""``probe(host, port, timeout)``: return once sshd answers, else raise an InstanceError."""


class Reporter(Protocol):
    def report(self, results: Sequence[Result]) -> Delivery: ...


@dataclass
class Deps:
    """Everything ``test_ami`` talks to."""

    cfg: AutocloudConfig
    aws: Any  # anything with .ec2(region): fedimg.aws.AwsClients
    reporter: Reporter
    emitter: Emitter
    session_factory: SessionFactory = paramiko_session
    port_probe: PortProbe = wait_for_ssh_port
    output: OutputStore | None = None
    suite: Sequence[Check] = SUITE
    slots: threading.BoundedSemaphore = field(default_factory=lambda: threading.BoundedSemaphore(4))
    retry_backoff: float = 10.0

    @classmethod
    def from_config(cls, cfg: AutocloudConfig, emitter: Emitter) -> Deps:
        """The production wiring for ``cfg``."""
        return cls(
            cfg=cfg,
            aws=AwsClients(max_attempts=cfg.aws_max_attempts, component="autocloud_ami"),
            reporter=reporter_for(cfg),
            emitter=emitter,
            output=output_for(cfg),
            slots=threading.BoundedSemaphore(cfg.max_concurrent),
            retry_backoff=min(10.0, cfg.poll_interval * 2),
        )


def reporter_for(cfg: AutocloudConfig) -> ResultsReporter:
    return make_reporter(
        cfg.resultsdb_url,
        cfg.resultsdb_spool,
        retries=cfg.resultsdb_retries,
        backoff=cfg.resultsdb_backoff,
        timeout=cfg.resultsdb_timeout,
    )


def output_for(cfg: AutocloudConfig) -> OutputStore | None:
    return OutputStore(Path(cfg.output_dir), cfg.output_url) if cfg.output_dir else None


# -- the pure parts -------------------------------------------------------------------


def check_request(request: StagedImage, cfg: AutocloudConfig) -> tuple[str, ...]:
    """The instance types (scenarios) to test ``request`` on, or InvalidRequest saying why not."""
    if not request.ami_id:
        raise InvalidRequest(f"{request.compose_id} {request.image_name}: no AMI id to test")
    if not AMI_ID_RE.match(request.ami_id):
        raise InvalidRequest(f"{request.compose_id}: not an AMI id: {request.ami_id[:100]!r}")
    if not REGION_RE.match(request.region) or request.region not in cfg.regions:
        raise InvalidRequest(
            f"{request.compose_id} {request.ami_id}: region {request.region[:50]!r} is not "
            f"one this runner tests ({', '.join(cfg.regions)})"
        )
    types = cfg.matrix.get(request.architecture)
    if not types:
        raise InvalidRequest(
            f"{request.compose_id} {request.ami_id}: no instance type for architecture "
            f"{request.architecture[:30]!r} (have {', '.join(sorted(cfg.matrix))})"
        )
    return types


def scenario_job_id(job_id: str, instance_type: str, count: int) -> str:
    """The job id of one scenario: the job's own when it is the only one.

    It names the scenario's key pair and security group and is its
    run_instances ClientToken (at most 64 characters: 32 + 1 + a type name).
    """
    return job_id if count == 1 else f"{job_id}-{instance_type}"


def test_request(body: Any) -> StagedImage | None:
    """The image a ``fedimg.image.test`` body asks to test; None for a verdict on that topic.

    Raises InvalidMessage for a malformed body or a request without an AMI id.
    """
    status, image = parse_image_event(body, IMAGE_TEST)
    if status != "started":
        log.debug("%s: fedimg.image.test %s, not a request", image.compose_id, status)
        return None
    if image.ami_id is None:
        raise InvalidMessage(f"{image.compose_id}: test request without extra.id (AMI id)")
    return image


test_request.__test__ = False  # type: ignore[attr-defined]  # not a pytest test


def declared_family(subvariant: str) -> Family | None:
    try:
        return family_for(subvariant)
    except ValueError:
        return None


@dataclass(frozen=True)
class ScenarioResult:
    """What one scenario (one instance type, one instance) of a run did."""

    scenario: str  # fedimg.messages.scenario_name(arch, instance type)
    instance_type: str
    job_id: str
    report: SuiteReport
    results: tuple[Result, ...]  # its tests, its summary last
    reason: str | None = None  # why the tests could not run
    results_url: str | None = None
    cleanup_errors: tuple[str, ...] = ()
    timings: Mapping[str, float] = field(default_factory=dict)

    @property
    def outcome(self) -> str:
        """The scenario's summary outcome (PASSED, FAILED or NEEDS_INSPECTION)."""
        return self.results[-1].outcome

    @property
    def passed(self) -> bool:
        return self.outcome == PASSED


@dataclass(frozen=True)
class JobResult:
    """What one run did: every scenario of the AMI's architecture, in the matrix's order."""

    job_id: str
    image: StagedImage
    scenarios: tuple[ScenarioResult, ...]
    delivery: Delivery | None
    results_url: str | None = None
    job_timings: Mapping[str, float] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        """Every scenario's summary PASSED (what fedimg's gate must read)."""
        return bool(self.scenarios) and all(s.passed for s in self.scenarios)

    @property
    def results(self) -> tuple[Result, ...]:
        """Every result in the order posted (``posting_order``)."""
        return posting_order(self.scenarios)

    @property
    def report(self) -> SuiteReport:
        """The first scenario's report (the only one with one instance type per arch)."""
        return self.scenarios[0].report

    @property
    def reason(self) -> str | None:
        """Why tests could not run, per scenario; None when they all ran."""
        reasons = [(s.scenario, s.reason) for s in self.scenarios if s.reason]
        if len(self.scenarios) == 1:
            return reasons[0][1] if reasons else None
        return "; ".join(f"{name}: {why}" for name, why in reasons) or None

    @property
    def cleanup_errors(self) -> tuple[str, ...]:
        return tuple(e for s in self.scenarios for e in s.cleanup_errors)

    @property
    def timings(self) -> dict[str, float]:
        """The first scenario's steps and the job's own, seconds since the request."""
        return {**self.scenarios[0].timings, **self.job_timings}

    def counts(self) -> tuple[int, int]:
        """(passed, failed) over every check of every scenario."""
        passed, failed = zip(*(s.report.counts() for s in self.scenarios), strict=True)
        return sum(passed), sum(failed)

    def verdict(self) -> Result:
        """The summary that decides: the first that did not pass, else the last."""
        return next((s.results[-1] for s in self.scenarios if not s.passed), self.results[-1])


def posting_order(scenarios: Sequence[ScenarioResult]) -> tuple[Result, ...]:
    """Every scenario's tests, then the summaries: the PASSED ones first.

    Each summary stays last of its scenario. A gate that reads only the newest
    ``autocloud.ami.all`` of an AMI then ends on a non-PASSED one whenever a
    scenario did not pass, and sees no summary before every test is posted.
    """
    tests = [r for s in scenarios for r in s.results[:-1]]
    summaries = sorted((s.results[-1] for s in scenarios), key=lambda r: r.outcome != PASSED)
    return (*tests, *summaries)


def log_finished(image: StagedImage, result: JobResult) -> None:
    """The consumers' one line for a job that ran to its end."""
    verdict = PASSED if result.passed else FAILED
    log.info("%s %s: job %s finished: %s", image.compose_id, image.ami_id, result.job_id, verdict)


def output_text(outcome: TestOutcome) -> str:
    head = [
        f"test:     {outcome.test_id}",
        f"outcome:  {outcome_name(outcome.outcome)}",
        f"gating:   {'yes' if outcome.gating else 'no'}",
        f"note:     {outcome.note}",
        f"duration: {outcome.duration:.2f}s",
        "",
    ]
    return "\n".join(head) + (outcome.output or "(no output)\n")


def index_lines(
    image: StagedImage, job_id: str, report: SuiteReport, verdict: str, scenario: str = ""
) -> list[str]:
    lines = [
        f"AMI {image.ami_id} in {image.region}: {image.image_name} ({image.architecture})",
        f"compose {image.compose_id}, job {job_id}, family {report.family}: {verdict}",
        *([f"scenario {scenario}"] if scenario else []),
        "",
    ]
    for o in report.outcomes:
        gate = "gating" if o.gating else "non-gating"
        lines.append(f"{outcome_name(o.outcome):8} {o.test_id:32} {gate:10} {o.note}")
    return lines


# -- the job --------------------------------------------------------------------------


class _Scenario:
    """One scenario of a run: its own instance, key pair and security group."""

    def __init__(
        self, request: StagedImage, deps: Deps, job_id: str, itype: str, t0: float
    ) -> None:
        self.request = request
        self.deps = deps
        self.cfg = deps.cfg
        self.job_id = job_id
        self.itype = itype
        self.scenario = scenario_name(request.architecture, itype)
        assert request.ami_id is not None
        self.ami_id: str = request.ami_id
        self.ctx = (
            f"{request.compose_id} {request.ami_id} ({request.region}, {self.scenario}, "
            f"job {job_id})"
        )
        self.timings: dict[str, float] = {}
        self.cleanup_errors: tuple[str, ...] = ()
        self.t0 = t0
        self.run_scenarios: tuple[str, ...] = (self.scenario,)

    def mark(self, what: str) -> None:
        self.timings[what] = round(time.monotonic() - self.t0, 3)

    def run_tests(self) -> tuple[SuiteReport, str | None]:
        """Instance type, instance, SSH, suite, cleanup: always a report, never an exception."""
        cfg = self.cfg
        declared = declared_family(self.request.subvariant)
        traits: frozenset[str] = frozenset()
        instance: TestInstance | None = None
        hard_stop = time.monotonic() + cfg.deadline
        outcome = FAILED
        try:
            ec2 = self.deps.aws.ec2(self.request.region)
            facts = describe_type(ec2, self.itype, self.request.region, self.request.architecture)
            traits = facts.traits
            spec = launch_spec(
                region=self.request.region,
                ami_id=self.ami_id,
                job_id=self.job_id,
                instance_type=self.itype,
                ssh_cidr=cfg.ssh_cidr,
                lifetime=cfg.deadline,
                subnet_id=cfg.subnet_id,
                self_destruct=cfg.self_destruct,
                # Atomic Host's cloud-init (17.1) cannot fetch metadata with IMDSv2 tokens.
                imds_tokens_required=declared != Family.ATOMIC,
                extra_tags=cfg.extra_tags,
            )
            timeouts = Timeouts(
                boot=cfg.boot_timeout,
                host_key_wait=cfg.host_key_wait,
                cleanup=cfg.cleanup_timeout,
                launch_retry=cfg.launch_retry_timeout,
                poll=cfg.poll_interval,
            )
            instance = TestInstance(
                ec2,
                spec,
                timeouts,
                ssh_override=cfg.ssh_override_address,
                require_host_key=cfg.require_host_key,
            )
            with instance:
                self.mark("instance_running")
                assert instance.key is not None
                target = SshTarget(
                    instance.host, instance.port, cfg.ssh_user, instance.key, instance.fingerprints
                )
                report = self.run_suite(target, declared, hard_stop, traits)
            return report, None
        except TypeUnavailable as exc:
            # Not the image's fault: a person must change the matrix or retry later.
            reason = f"{type(exc).__name__}: {exc}"
            outcome = NEEDS_INSPECTION
            log.error("%s: instance type unavailable: %s", self.ctx, reason)
        except (InstanceError, SshError) as exc:
            reason = f"{type(exc).__name__}: {exc}"
            log.error("%s: tests could not run: %s", self.ctx, reason)
        except Exception as exc:
            reason = f"internal error: {type(exc).__name__}: {exc}"
            log.exception("%s: tests could not run", self.ctx)
        finally:
            if instance is not None:
                self.cleanup_errors = tuple(instance.cleanup_errors)
            self.mark("cleaned_up")
        report = not_run(
            self.deps.suite, reason[:500], family=declared, traits=traits, outcome=outcome
        )
        return report, reason

    def run_suite(
        self,
        target: SshTarget,
        declared: Family | None,
        hard_stop: float,
        traits: frozenset[str],
    ) -> SuiteReport:
        cfg = self.cfg
        session = self.deps.session_factory(target)
        try:
            ssh_deadline = time.monotonic() + min(
                cfg.ssh_timeout, max(1.0, hard_stop - time.monotonic())
            )
            self.deps.port_probe(target.host, target.port, ssh_deadline - time.monotonic())
            self.mark("ssh_port")
            session.connect(max(1.0, ssh_deadline - time.monotonic()))
            self.mark("ssh_connected")
            log.info("%s: SSH to %s:%s works", self.ctx, target.host, target.port)
            family = detect_family(session, declared) if declared is not None else None
            report = run_suite(
                session,
                self.deps.suite,
                reboot_timeout=cfg.reboot_timeout,
                log_context=self.ctx,
                family=family,
                reconnect_timeout=min(cfg.ssh_timeout, cfg.reboot_timeout),
                retry_backoff=self.deps.retry_backoff,
                reboot_poll=cfg.poll_interval,
                traits=traits,
            )
            self.mark("suite_done")
            return report
        finally:
            session.close()

    def keep_outputs(self, report: SuiteReport, verdict: str) -> tuple[dict[str, str], str | None]:
        store = self.deps.output
        if store is None:
            return {}, None
        urls: dict[str, str] = {}
        try:
            for o in report.outcomes:
                url = store.write(self.ami_id, self.job_id, o.test_id, output_text(o))
                if url:
                    urls[o.test_id] = url
            lines = index_lines(self.request, self.job_id, report, verdict, self.scenario)
            index = store.write_index(self.ami_id, self.job_id, lines)
        except OSError as exc:
            log.error("%s: could not keep test output in %s: %s", self.ctx, store.root, exc)
            return {}, None
        return urls, index

    def run(self) -> ScenarioResult:
        """Test, keep the output, build the results (posted by the job, all together)."""
        report, reason = self.run_tests()
        ref_urls, index_url = self.keep_outputs(report, summary_of(report.outcomes)[0])
        results = build_results(
            self.request,
            report.outcomes,
            job_id=self.job_id,
            family=str(report.family),
            scenario=self.scenario,
            run_scenarios=self.run_scenarios,
            ref_urls=ref_urls,
            summary_url=index_url,
        )
        log.log(
            logging.INFO if results[-1].outcome == PASSED else logging.WARNING,
            "%s: %s: %s",
            self.ctx,
            results[-1].outcome,
            results[-1].note,
        )
        return ScenarioResult(
            scenario=self.scenario,
            instance_type=self.itype,
            job_id=self.job_id,
            report=report,
            results=tuple(results),
            reason=reason,
            results_url=index_url,
            cleanup_errors=self.cleanup_errors,
            timings=dict(self.timings),
        )


class _Job:
    """One test request: its messages, its slot, its scenarios, its delivery."""

    def __init__(self, request: StagedImage, deps: Deps, job_id: str) -> None:
        self.request = request
        self.deps = deps
        self.job_id = job_id
        assert request.ami_id is not None
        self.ami_id: str = request.ami_id
        self.ctx = f"{request.compose_id} {request.ami_id} ({request.region}, job {job_id})"
        self.results_url = (
            deps.output.url(self.ami_id, job_id, "index.txt") if deps.output else None
        )
        self.t0 = time.monotonic()
        self.timings: dict[str, float] = {}

    def mark(self, what: str) -> None:
        self.timings[what] = round(time.monotonic() - self.t0, 3)

    def event(self, passed: int = 0, failed: int = 0, reason: str | None = None) -> AmiTestEvent:
        r = self.request
        return AmiTestEvent(
            compose_id=r.compose_id,
            ami_id=self.ami_id,
            region=r.region,
            job_id=self.job_id,
            image_name=r.image_name,
            architecture=r.architecture,
            passed=passed,
            failed=failed,
            results_url=self.results_url,
            reason=reason,
        )

    def emit(self, mtype: MessageType, body: dict[str, Any]) -> None:
        try:
            self.deps.emitter.emit(mtype, body)
        except Exception:
            # Messages are hints; ResultsDB is the record. Never fail a run for them.
            log.exception("%s: could not publish %s", self.ctx, mtype)

    def run_scenarios(self, types: Sequence[str]) -> tuple[ScenarioResult, ...]:
        """Every scenario at once, each on its own instance (one thread each)."""
        runs = [
            _Scenario(
                self.request, self.deps, scenario_job_id(self.job_id, t, len(types)), t, self.t0
            )
            for t in types
        ]
        names = tuple(run.scenario for run in runs)
        for run in runs:
            run.run_scenarios = names
        if len(runs) == 1:
            return (runs[0].run(),)
        with ThreadPoolExecutor(len(runs), thread_name_prefix="autocloud-scenario") as pool:
            return tuple(pool.map(_Scenario.run, runs))

    def keep_index(self, scenarios: Sequence[ScenarioResult]) -> str | None:
        """With several scenarios, one index of them all where the messages point."""
        store = self.deps.output
        if store is None or len(scenarios) == 1:
            return scenarios[0].results_url if scenarios else None
        lines: list[str] = []
        for s in scenarios:
            lines += index_lines(self.request, s.job_id, s.report, s.outcome, s.scenario)
            lines += [f"output: {s.results_url or '(not kept)'}", ""]
        try:
            return store.write_index(self.ami_id, self.job_id, lines)
        except OSError as exc:
            log.error("%s: could not keep the job's index in %s: %s", self.ctx, store.root, exc)
            return None

    def deliver(self, results: Sequence[Result]) -> Delivery | None:
        try:
            delivery = self.deps.reporter.report(results)
        except Exception:
            log.exception(
                "%s: results could not be posted nor spooled; they were: %s",
                self.ctx,
                [(r.testcase, r.outcome, r.note) for r in results],
            )
            return None
        if not delivery.complete:
            log.warning(
                "%s: %d results spooled until ResultsDB is back (%d pending in all)",
                self.ctx,
                delivery.spooled,
                delivery.pending,
            )
        return delivery


def test_ami(request: StagedImage, deps: Deps, *, job_id: str | None = None) -> JobResult:
    """Test one staged AMI in every scenario of its architecture and report every result.

    The scenarios run at once, each on its own instance, within the one test
    slot the AMI takes; their results are posted together once all are done,
    scenario by scenario, each scenario's summary last.
    """
    types = check_request(request, deps.cfg)
    job = _Job(request, deps, job_id or new_job_id())
    log.info("%s: queued (%s, %s)", job.ctx, request.image_name, ", ".join(types))
    job.emit(AMI_QUEUED, job.event().body("queued"))
    if not deps.slots.acquire(timeout=deps.cfg.queue_timeout):
        why = f"no test slot free within {deps.cfg.queue_timeout:.0f}s"
        log.error("%s: %s", job.ctx, why)
        job.emit(AMI_FAILED, job.event(reason=why).body("failed"))
        raise QueueTimeout(f"{job.ctx}: {why}")
    try:
        job.mark("slot")
        job.emit(AMI_RUNNING, job.event().body("running"))
        scenarios = job.run_scenarios(types)
    finally:
        deps.slots.release()
    index_url = job.keep_index(scenarios)
    delivery = job.deliver(posting_order(scenarios))
    job.mark("reported")
    outcome = JobResult(
        job_id=job.job_id,
        image=request,
        scenarios=scenarios,
        delivery=delivery,
        results_url=index_url,
        job_timings=dict(job.timings),
    )
    passed, failed = outcome.counts()
    verdict = outcome.verdict()
    event = job.event(passed, failed, None if outcome.passed else (outcome.reason or verdict.note))
    if outcome.passed:
        job.emit(AMI_SUCCESS, event.body("success"))
    else:
        job.emit(AMI_FAILED, event.body("failed"))
    log.log(
        logging.INFO if outcome.passed else logging.WARNING,
        "%s: %s",
        job.ctx,
        ", ".join(f"{s.scenario} {s.outcome}" for s in scenarios),
    )
    return outcome


test_ami.__test__ = False  # type: ignore[attr-defined]  # not a pytest test
