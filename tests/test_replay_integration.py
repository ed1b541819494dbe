"""A production message replayed with the real fedmsg-dg-replay lands on the local bus."""

from __future__ import annotations

import subprocess

import pytest
import requests

from devel.bus import BIN, LocalBus
from devel.datagrepper import Datagrepper

pytestmark = pytest.mark.integration


def test_dg_replay_republishes_under_the_local_environment(local_bus: LocalBus) -> None:
    with Datagrepper() as dg:
        msg_id = dg.store.add(
            "org.fedoraproject.prod.pungi.compose.status.change",
            {"status": "DOOMED", "compose_id": "Fedora-28-20180425.0"},
        )
        result = subprocess.run(
            [str(BIN / "fedmsg-dg-replay"), "--msg-id", msg_id, "--datagrepper-url", dg.url],
            cwd=local_bus.workdir,
            env=local_bus.env(),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert local_bus.tap is not None
        seen = local_bus.tap.wait_for("pungi.compose.status.change", timeout=30)
        assert seen.topic == "org.fedoraproject.dev.pungi.compose.status.change"
        assert seen.body == {"status": "DOOMED", "compose_id": "Fedora-28-20180425.0"}


def test_dg_replay_of_an_unknown_id_fails(local_bus: LocalBus) -> None:
    with Datagrepper() as dg:
        result = subprocess.run(
            [str(BIN / "fedmsg-dg-replay"), "--msg-id", "2026-nope", "--datagrepper-url", dg.url],
            cwd=local_bus.workdir,
            env=local_bus.env(),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert result.returncode != 0


def page_query(page: int) -> dict[str, int | str]:
    return {"start": 1001, "end": 1003, "order": "asc", "rows_per_page": 2, "page": page}


def test_backlog_query_pages_in_order() -> None:
    with Datagrepper() as dg:
        ids = [dg.store.add("t.a", {"n": n}, timestamp=1000 + n) for n in range(5)]
        page = requests.get(
            f"{dg.url}/raw",
            params=page_query(1),
            timeout=10,
        ).json()
        assert page["pages"] == 2
        assert [m["msg_id"] for m in page["raw_messages"]] == ids[1:3]
        page2 = requests.get(
            f"{dg.url}/raw",
            params=page_query(2),
            timeout=10,
        ).json()
        assert [m["msg_id"] for m in page2["raw_messages"]] == ids[3:4]
