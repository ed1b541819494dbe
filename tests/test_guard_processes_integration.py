"""The engine's guard across PROCESSES sharing ``fedimg.state_dir``: three workers, one promotion.

Three processes (``multiprocessing``, forked before any engine exists: nothing
shared but the state directory and moto_server) each build their own ``Engine`` and call
``converge_ami`` on the same ``testing`` AMI at the same moment (a barrier).
ResultsDB says PASSED. The process that gets the AMI's lock is held inside
its ResultsDB read (under the lock) until the parent has heard the two
others answer, so the three really meet; then it releases. Exactly one
``release``, the others ``busy``; one copy per region, one release message. And
when the summary lands while the holder reads ResultsDB (it sees nothing yet),
the others' marks make it look again: still one release, nothing lost.
The same over RabbitMQ with fedora-messaging consumers: test_amqp_integration.py.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from devel.motoserver import MotoServer
from fedimg import tags
from tests.e2e_support import ami_in_testing

pytestmark = pytest.mark.integration

STAGING = "us-east-1"
TARGETS = ["eu-west-1", "us-west-2"]
DEADLINE = 120.0


class HeldResults:
    """A ResultsDB that says PASSED, once ``others_done`` is set (the lock holder waits here).

    ``late``: the first answer has no result yet (the summary lands while it is
    read, as its message reaches the other workers); the next one has it.
    """

    def __init__(self, others_done: Any, late: bool) -> None:
        from fedimg.results import DummyResults

        self.others_done = others_done
        self.late = late
        self.real = DummyResults()

    def latest_by_scenario(self, item: str, item_type: str = "ami", testcases: Any = None) -> Any:
        assert self.others_done.wait(DEADLINE), "the other workers never answered"
        answer = self.real.latest_by_scenario(item, item_type, testcases)
        if not answer:
            self.real.add(item, "autocloud.ami.all", "PASSED")
        return answer if self.late else self.real.latest_by_scenario(item, item_type, testcases)

    def latest(self, item: str, item_type: str = "ami", testcases: Any = None) -> Any:
        return self.real.latest(item, item_type, testcases)


def worker(
    env: dict[str, str], state_dir: str, ami: str, sync: tuple[Any, Any, Any], late: bool
) -> None:
    """One fedimg process: its own engine, one convergence of ``ami``; reports what it did."""
    os.environ.update(env)
    barrier, done, out = sync
    from fedimg.aws import AwsClients
    from fedimg.config import FedimgConfig
    from fedimg.messages import Emitter
    from fedimg.plan import Scope
    from tests.conftest import Recorder
    from tests.engine_support import make_engine

    cfg = FedimgConfig(
        resultsdb_url="http://127.0.0.1:9/api/v2.0",
        promote_enabled=True,
        staging_region=STAGING,
        regions=TARGETS,
        state_dir=state_dir,
    )
    recorder = Recorder()
    engine = make_engine(
        cfg,
        Emitter(recorder),
        AwsClients(max_attempts=2),
        Path(state_dir),
        results=HeldResults(done, late),
    )
    try:
        barrier.wait(DEADLINE)
        outcome = engine.converge_ami(ami, Scope.MESSAGE)
        out.put((os.getpid(), outcome.action, recorder.topics()))
    finally:
        engine.close()


@pytest.fixture
def moto(monkeypatch: pytest.MonkeyPatch) -> Iterator[MotoServer]:
    monkeypatch.setenv("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")
    with MotoServer() as server:
        yield server


@pytest.mark.parametrize(
    "late",
    [False, True],
    ids=["passed-before", "summary-lands-while-the-holder-reads"],
)
def test_three_processes_converging_one_ami_at_once_promote_it_once(
    moto: MotoServer, tmp_path: Path, late: bool
) -> None:
    env = moto.env()
    ec2 = boto3.client("ec2", region_name=STAGING, endpoint_url=moto.url)
    ami = ami_in_testing(ec2, 1)
    ctx = multiprocessing.get_context("fork")
    barrier, done, out = ctx.Barrier(3), ctx.Event(), ctx.Queue()
    procs = [
        ctx.Process(target=worker, args=(env, str(tmp_path), ami, (barrier, done, out), late))
        for _ in range(3)
    ]
    for proc in procs:
        proc.start()
    try:
        first, second = out.get(timeout=DEADLINE), out.get(timeout=DEADLINE)
        done.set()  # the two others answered: the holder may go on
        third = out.get(timeout=DEADLINE)
    finally:
        done.set()
        for proc in procs:
            proc.join(timeout=DEADLINE)
            if proc.is_alive():
                proc.kill()
    assert {first[0], second[0], third[0]} == {p.pid for p in procs}  # three processes
    # With ``late``, the holder first found no result: only the others' marks made it
    # look again (a "busy" answer is never a lost result).
    assert (first[1], second[1], third[1]) == ("busy", "busy", "release")
    assert first[2] == second[2] == []  # the busy ones published nothing
    assert third[2].count("fedimg.image.release") == 1
    assert third[2].count("fedimg.image.copy") == len(TARGETS)
    for region in TARGETS:
        copies = boto3.client("ec2", region_name=region, endpoint_url=moto.url).describe_images(
            Owners=["self"], Filters=[{"Name": f"tag:{tags.SOURCE_AMI}", "Values": [ami]}]
        )["Images"]
        assert len(copies) == 1, region
    assert all(p.exitcode == 0 for p in procs)
