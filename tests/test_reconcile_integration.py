"""A result whose message the hub never saw is acted on by the reconcile producer at start."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import resultsdb_api

from devel.bus import LocalBus, free_port, wait_for_port, wait_until
from devel.motoserver import MotoServer
from tests.test_promote_integration import REPO, STAGING, TARGETS, TESTCASE, copies, stage, state

pytestmark = pytest.mark.integration


def test_results_posted_while_the_hub_was_down_are_gated_at_start(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")
    port = free_port()
    rdb_url = f"http://127.0.0.1:{port}/api/v2.0"
    with MotoServer() as moto:
        settings = {
            "fedimg.promote.enabled": True,
            "fedimg.resultsdb_url": rdb_url,
            "fedimg.aws.staging_region": STAGING,
            "fedimg.aws.regions": TARGETS,
            "fedimg.reconcile.interval": 3600.0,  # only the pass at start-up matters here
        }
        env = {**moto.env(), "PYTHONPATH": str(REPO)}
        with LocalBus(settings=settings, extra_env=env) as bus:
            bus.spawn(
                "resultsdb",
                [
                    sys.executable,
                    "-m",
                    "devel.resultsdb",
                    "--port",
                    str(port),
                    "--no-bus",
                    "--db",
                    str(tmp_path / "rdb.sqlite"),
                ],
            )
            wait_for_port("127.0.0.1", port, 30, "the ResultsDB stand-in")
            good, bad, waiting = stage(moto, 1), stage(moto, 2), stage(moto, 3)
            client = resultsdb_api.ResultsDBapi(rdb_url)
            client.create_result(outcome="PASSED", testcase=TESTCASE, item=good, type="ami")
            client.create_result(outcome="FAILED", testcase=TESTCASE, item=bad, type="ami")
            # No hub was listening and the stand-in published nothing: only the
            # reconcile pass can find these.
            assert bus.tap is not None
            assert bus.tap.messages("resultsdb.result.new") == []

            hub = bus.start_hub()
            wait_until(lambda: state(moto, good) == "released", 90, "the good AMI released")
            wait_until(lambda: state(moto, bad) == "rejected", 30, "the bad AMI rejected")
            for region in TARGETS:
                assert len(copies(moto, region, good)) == 1
                assert copies(moto, region, bad) == []
            # No result at all, deadline not reached: it keeps waiting.
            assert state(moto, waiting) == "testing"
            assert hub.alive
