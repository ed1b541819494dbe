"""A real ``moto_server`` on a free loopback port, as the AWS endpoint.

It runs with ``devel.motoextra`` installed: the few calls fedimg makes that
moto 5.2 does not implement (image deprecation, image block public access,
the public-AMI quota) are answered by moto itself, and recorded like the rest.

``AWS_ENDPOINT_URL`` (botocore 1.31+) points every boto3 client at it without
code changes, which is how the hub, the CLIs and the demo reach it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import requests

from devel.awscalls import AwsCall, parse_recording
from devel.bus import BIN, ManagedProcess, free_port, wait_until

REPO = Path(__file__).resolve().parent.parent
DEVEL_PUBLIC_AMI_QUOTA = 1000
FAKE_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


class MotoServer:
    """Start ``moto_server`` and stop it (and its temp dir) on exit."""

    def __init__(
        self, host: str = "127.0.0.1", port: int | None = None, record: bool = False
    ) -> None:
        self.host = host
        self.record = record
        self.port = port or free_port()
        self.url = f"http://{host}:{self.port}"
        self._dir: Path | None = None
        self._proc: ManagedProcess | None = None

    def env(self) -> dict[str, str]:
        """Environment variables that send boto3 to this server with fake credentials."""
        return {**FAKE_CREDENTIALS, "AWS_ENDPOINT_URL": self.url}

    def start(self, timeout: float = 60.0) -> MotoServer:
        """Start moto_server and wait until it answers."""
        return self.launch().wait_ready(timeout)

    def launch(self) -> MotoServer:
        """Start moto_server without waiting for it (``wait_ready`` waits): a stack starts
        its other processes while moto_server imports."""
        self._dir = Path(tempfile.mkdtemp(prefix="fedimg-moto-"))
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(FAKE_CREDENTIALS)
        if self.record:  # moto's recorder logs every request it answers
            env["MOTO_ENABLE_RECORDING"] = "1"
            env["MOTO_RECORDER_FILEPATH"] = str(self.recording_path)
        # moto_server, taught what moto lacks of the APIs fedimg calls (devel.motoextra).
        # Its account has a raised public-AMI quota (AWS's default is 5 per region): a
        # stack or a module of tests releases more images than that into one server.
        env.setdefault("FEDIMG_DEVEL_PUBLIC_AMI_QUOTA", str(DEVEL_PUBLIC_AMI_QUOTA))
        # Without moto's hundreds of public AMIs per region (CPU at every region's first
        # call, and noise in every listing): the stack only runs the images it staged.
        env.setdefault("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        self._proc = ManagedProcess(
            name="moto_server",
            argv=[
                str(BIN / "python"),
                "-m",
                "devel.motoextra",
                "-H",
                self.host,
                "-p",
                str(self.port),
            ],
            cwd=self._dir,
            env=env,
            log_path=self._dir / "moto_server.log",
        ).start()
        return self

    def wait_ready(self, timeout: float = 60.0) -> MotoServer:
        """Wait until the launched moto_server answers (WaitTimeout after ``timeout``)."""
        wait_until(self._healthy, timeout, f"moto_server on {self.url}", interval=0.1)
        return self

    def _healthy(self) -> bool:
        if self._proc is not None and not self._proc.alive:
            raise RuntimeError(f"moto_server exited:\n{self._proc.output()[-4000:]}")
        try:
            return requests.get(f"{self.url}/moto-api/", timeout=2).ok
        except requests.RequestException:
            return False

    @property
    def recording_path(self) -> Path:
        assert self._dir is not None, "start() first"
        return self._dir / "requests.jsonl"

    def recorded_calls(self) -> list[AwsCall]:
        """Every AWS API call answered so far (needs ``record=True``)."""
        if not self.recording_path.exists():
            return []
        with self.recording_path.open() as lines:
            return parse_recording(lines)

    def reset(self) -> None:
        """Forget every resource (and every uploaded block) moto holds."""
        requests.post(f"{self.url}/moto-api/reset", timeout=30).raise_for_status()

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.stop()
            self._proc = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> MotoServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def snapshot_blocks(ebs: Any, snapshot_id: str) -> Iterator[tuple[int, bytes]]:
    """(index, data) of every block an EBS snapshot holds, listed page by page, read one by one."""
    kwargs: dict[str, Any] = {"SnapshotId": snapshot_id}
    while True:
        page = ebs.list_snapshot_blocks(**kwargs)
        for block in page["Blocks"]:
            data = ebs.get_snapshot_block(
                SnapshotId=snapshot_id,
                BlockIndex=block["BlockIndex"],
                BlockToken=block["BlockToken"],
            )["BlockData"].read()
            yield block["BlockIndex"], data
        if not page.get("NextToken"):
            return
        kwargs["NextToken"] = page["NextToken"]
