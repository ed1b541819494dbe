"""Durable compose intents (``fedimg.intents``) and the cross-process locks (``fedimg.locks``).

Real files in a temporary state directory, real ``flock``; a second process is
a real ``python`` child. A crash in the middle of a write is made by failing
``os.replace`` (or the write itself) and checking what is on disk.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from fedimg.compose import CloudImage
from fedimg.intents import Intent, IntentError, IntentStore
from fedimg.locks import Guard

COMPOSE = "Fedora-40-20240601.0"
ROOT = Path(__file__).resolve().parent.parent
DEADLINE = 30.0  # seconds a child gets to answer; never reached when things work


def image(n: int) -> CloudImage:
    name = f"Fedora-Cloud-Base-40-20240601.0.{n}.x86_64.raw.xz"
    return CloudImage(
        compose_id=COMPOSE,
        variant="Cloud",
        arch="x86_64",
        subvariant="Cloud_Base",
        format="raw.xz",
        path=f"Cloud/x86_64/images/{name}",
        url=f"https://kojipkgs.example/compose/Cloud/x86_64/images/{name}",
        size=1000 + n,
        sha256=f"{n:064x}",
        image_name=name,
        type="raw-xz",
        release="40",
    )


def intent(compose_id: str = COMPOSE, **kw: Any) -> Intent:
    return Intent(
        compose_id=compose_id,
        location="https://kojipkgs.example/compose/40/" + compose_id,
        release_version="40",
        accepted_at="2026-06-01T12:00:00+00:00",
        **kw,
    )


@pytest.fixture
def store(tmp_path: Path) -> IntentStore:
    return IntentStore(tmp_path / "state")


def files(store: IntentStore) -> list[str]:
    return sorted(p.name for p in store.root.iterdir()) if store.root.is_dir() else []


# -- the store --------------------------------------------------------------------------


def test_record_get_update_drop_round_trip(store: IntentStore) -> None:
    assert store.get(COMPOSE) is None and store.compose_ids() == []
    first = intent()
    assert store.record(first) == first
    assert store.get(COMPOSE) == first
    assert store.compose_ids() == [COMPOSE]

    full = replace(
        first,
        images=(image(1), image(2)),
        read_attempts=2,
        staged=(image(1).sha256,),
        attempts={image(2).sha256: 2},
        given_up={image(3).sha256: "HTTP 404"},
        last_error="timed out",
    )
    assert store.update(COMPOSE, lambda _: full) == full
    assert store.get(COMPOSE) == full  # every field survives the file
    on_disk = json.loads((store.root / f"{COMPOSE}.json").read_text())
    assert on_disk["version"] == 1 and on_disk["images"][1]["sha256"] == image(2).sha256

    # A new store on the same directory (a restarted process) reads the same intent.
    assert IntentStore(store.root.parent).get(COMPOSE) == full

    assert store.drop(COMPOSE) is True
    assert store.get(COMPOSE) is None and store.compose_ids() == []
    assert store.drop(COMPOSE) is False
    assert store.update(COMPOSE, lambda i: replace(i, read_attempts=9)) is None
    assert store.get(COMPOSE) is None  # update never creates
    assert [f for f in files(store) if not f.endswith(".lock")] == []


def test_record_keeps_the_intent_already_there(store: IntentStore) -> None:
    progressed = replace(intent(), images=(image(1),), staged=(image(1).sha256,))
    store.record(progressed)
    again = store.record(intent())  # a replayed message must not reset the progress
    assert again == progressed and store.get(COMPOSE) == progressed


def test_an_update_that_changes_nothing_does_not_write(
    store: IntentStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.record(intent())
    writes: list[str] = []
    real = os.replace

    def spy(src: Any, dst: Any) -> None:
        writes.append(str(dst))
        real(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    assert store.update(COMPOSE, lambda i: i) == intent()
    assert writes == []
    store.update(COMPOSE, lambda i: replace(i, read_attempts=1))
    assert writes == [str(store.root / f"{COMPOSE}.json")]


def test_compose_ids_oldest_first_and_only_intent_files(store: IntentStore) -> None:
    assert store.compose_ids() == []  # no folder yet
    names = ["Fedora-40-20240603.0", "Fedora-40-20240601.0", "Fedora-40-20240602.0"]
    for n, name in enumerate(names):
        store.record(intent(name))
        os.utime(store.root / f"{name}.json", (1_000_000 + n, 1_000_000 + n))
    (store.root / ".Fedora-40-20240604.0-x.tmp").write_text("{}")  # a write in flight
    (store.root / ".hidden.json").write_text("{}")
    (store.root / "not an id.json").write_text("{}")
    (store.root / "notes.txt").write_text("")
    assert store.compose_ids() == names
    os.utime(store.root / f"{names[0]}.json", (2_000_000, 2_000_000))  # updated last
    assert store.compose_ids() == [names[1], names[2], names[0]]


def test_check_creates_the_folder_and_refuses_an_unusable_one(tmp_path: Path) -> None:
    fresh = IntentStore(tmp_path / "a" / "b")
    fresh.check()
    assert fresh.root.is_dir() and list(fresh.root.iterdir()) == []  # the probe is gone
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(IntentError):
        IntentStore(blocker).check()


# -- atomic writes --------------------------------------------------------------------------


class Died(BaseException):
    """Stands for the process dying in the middle of a write."""


@pytest.mark.parametrize("fault", [OSError("disk full"), Died()], ids=["error", "death"])
def test_a_failed_rename_leaves_the_old_file_and_no_temporary_one(
    store: IntentStore, monkeypatch: pytest.MonkeyPatch, fault: BaseException
) -> None:
    old = replace(intent(), images=(image(1),), attempts={image(1).sha256: 1})
    store.record(old)
    before = (store.root / f"{COMPOSE}.json").read_bytes()

    def boom(src: Any, dst: Any) -> None:
        raise fault

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(type(fault)):
        store.update(COMPOSE, lambda i: replace(i, attempts={image(1).sha256: 2}))
    with pytest.raises(type(fault)):
        store.record(intent("Fedora-40-20240602.0"))
    monkeypatch.undo()
    assert (store.root / f"{COMPOSE}.json").read_bytes() == before
    assert store.get(COMPOSE) == old
    assert store.get("Fedora-40-20240602.0") is None  # a half-made intent is not one
    assert not [f for f in files(store) if f.endswith(".tmp")]
    # The lock was released: the next update goes through.
    assert store.update(COMPOSE, lambda i: replace(i, read_attempts=1)) is not None


def test_a_write_that_dies_half_way_never_replaces_the_file(
    store: IntentStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.record(intent())
    before = (store.root / f"{COMPOSE}.json").read_bytes()
    real_fsync = os.fsync
    calls = [0]

    def die_on_first_fsync(fd: int) -> None:
        calls[0] += 1
        if calls[0] == 1:
            raise Died
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", die_on_first_fsync)
    with pytest.raises(Died):
        store.update(COMPOSE, lambda i: replace(i, images=(image(1),)))
    monkeypatch.undo()
    assert (store.root / f"{COMPOSE}.json").read_bytes() == before
    assert not [f for f in files(store) if f.endswith(".tmp")]


# -- bad files and bad ids ----------------------------------------------------------------------


def _valid() -> dict[str, Any]:
    return replace(intent(), images=(image(1),)).to_json()


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"{",
        b"\xff\xfe not utf-8",
        b"null",
        b"[]",
        b'"an intent"',
        json.dumps({**_valid(), "version": 2}).encode(),
        json.dumps({k: v for k, v in _valid().items() if k != "version"}).encode(),
        json.dumps({**_valid(), "compose_id": "../../etc/passwd"}).encode(),
        json.dumps({**_valid(), "compose_id": 40}).encode(),
        json.dumps({k: v for k, v in _valid().items() if k != "location"}).encode(),
        json.dumps({**_valid(), "images": 5}).encode(),
        json.dumps({**_valid(), "images": [{"sha256": "x"}]}).encode(),
        json.dumps({**_valid(), "images": ["not an image"]}).encode(),
        json.dumps({**_valid(), "read_attempts": "many"}).encode(),
        json.dumps({**_valid(), "attempts": {"a": "two"}}).encode(),
        json.dumps({**_valid(), "attempts": [1, 2]}).encode(),
        json.dumps({**_valid(), "given_up": 7}).encode(),
    ],
)
def test_a_malformed_intent_file_raises_intent_error(store: IntentStore, content: bytes) -> None:
    store.record(intent())
    (store.root / f"{COMPOSE}.json").write_bytes(content)
    with pytest.raises(IntentError):
        store.get(COMPOSE)
    with pytest.raises(IntentError):
        store.update(COMPOSE, lambda i: i)
    with pytest.raises(IntentError):
        store.record(intent())
    assert (store.root / f"{COMPOSE}.json").read_bytes() == content  # never overwritten


def test_an_unreadable_intent_file_raises_intent_error(store: IntentStore) -> None:
    store.root.mkdir(parents=True)
    (store.root / f"{COMPOSE}.json").mkdir()  # a directory where the file should be
    with pytest.raises(IntentError):
        store.get(COMPOSE)


def test_the_valid_reference_file_reads(store: IntentStore) -> None:
    """The file the malformed cases above start from is itself a good one."""
    store.record(intent())
    (store.root / f"{COMPOSE}.json").write_text(json.dumps(_valid()))
    found = store.get(COMPOSE)
    assert found is not None and found.images == (image(1),)


@pytest.mark.parametrize(
    "bad", ["", "../etc", "../../x", "a/b", ".hidden", "-rf", "x" * 201, "with space", "é"]
)
def test_bad_compose_ids_are_refused_and_nothing_is_written(
    store: IntentStore, tmp_path: Path, bad: str
) -> None:
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    with pytest.raises(IntentError):
        store.record(intent(bad))
    for call in (store.get, store.drop):
        with pytest.raises(IntentError):
            call(bad)
    with pytest.raises(IntentError):
        store.update(bad, lambda i: i)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


# -- concurrency ---------------------------------------------------------------------------------


def _bump(key: str) -> Any:
    def change(found: Intent) -> Intent:
        seen = found.attempts.get(key, 0)
        os.sched_yield()  # widen the read-modify-write window for the other writers
        return replace(found, attempts={**found.attempts, key: seen + 1})

    return change


def test_threads_updating_counts_lose_nothing(store: IntentStore) -> None:
    store.record(intent())
    threads, rounds = 4, 15
    start = threading.Barrier(threads)

    def worker(n: int) -> None:
        start.wait(timeout=DEADLINE)
        for _ in range(rounds):
            store.update(COMPOSE, _bump("shared"))
            store.update(COMPOSE, _bump(f"mine-{n % 2}"))

    with ThreadPoolExecutor(threads) as pool:
        for done in [pool.submit(worker, n) for n in range(threads)]:
            done.result(timeout=DEADLINE)  # re-raises what a worker raised
    found = store.get(COMPOSE)
    assert found is not None
    assert dict(found.attempts) == {
        "shared": threads * rounds,
        "mine-0": threads * rounds // 2,
        "mine-1": threads * rounds // 2,
    }


_UPDATER = textwrap.dedent(
    """
    import dataclasses, os, sys
    from fedimg.intents import IntentStore
    store = IntentStore(sys.argv[1])
    sys.stdout.write("ready\\n"); sys.stdout.flush()
    sys.stdin.readline()
    for _ in range(int(sys.argv[2])):
        def change(i):
            seen = i.attempts.get("shared", 0)
            os.sched_yield()
            return dataclasses.replace(i, attempts={**i.attempts, "shared": seen + 1})
        store.update(sys.argv[3], change)
    """
)


def _python(*args: str, **kw: Any) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
        **kw,
    )


def _expect(child: subprocess.Popen[str], line: str) -> None:
    assert child.stdout is not None
    got = child.stdout.readline().strip()  # the child answers or exits; never hangs the test
    assert got == line, f"child said {got!r}, rc={child.poll()}"


def test_processes_updating_counts_lose_nothing(store: IntentStore) -> None:
    store.record(intent())
    rounds = 25
    children = [_python(_UPDATER, str(store.root.parent), str(rounds), COMPOSE) for _ in range(2)]
    try:
        for child in children:
            _expect(child, "ready")
        for child in children:  # both start together
            assert child.stdin is not None
            child.stdin.write("go\n")
            child.stdin.flush()
        for _ in range(rounds):
            store.update(COMPOSE, _bump("shared"))
        assert [c.wait(timeout=DEADLINE) for c in children] == [0, 0]
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait(timeout=DEADLINE)
    found = store.get(COMPOSE)
    assert found is not None and found.attempts["shared"] == 3 * rounds


# -- the guard -------------------------------------------------------------------------------


@pytest.fixture
def guard(tmp_path: Path) -> Guard:
    return Guard(tmp_path / "state")


def test_a_key_is_held_once_even_within_one_thread(guard: Guard) -> None:
    with guard.hold("image-1") as first:
        assert first is True
        with guard.hold("image-1") as second:
            assert second is False
        with guard.hold("image-2") as other:
            assert other is True  # another key is independent
        assert guard.held("image-1") and not guard.held("image-3")
    with guard.hold("image-1") as again:
        assert again is True  # released on leaving
    assert not guard.held("image-1")


def test_a_key_released_by_an_exception(guard: Guard) -> None:
    with pytest.raises(RuntimeError), guard.hold("ami-1") as got:
        assert got
        raise RuntimeError("the work failed")
    assert not guard.held("ami-1")


def test_two_threads_exclude_each_other(guard: Guard) -> None:
    holding, release = threading.Event(), threading.Event()
    seen: list[bool] = []

    def holder() -> None:
        with guard.hold("image-x") as got:
            seen.append(got)
            holding.set()
            release.wait(timeout=DEADLINE)

    thread = threading.Thread(target=holder)
    thread.start()
    try:
        assert holding.wait(timeout=DEADLINE)
        with Guard(guard.root.parent).hold("image-x") as got:  # another Guard, same directory
            assert got is False
        assert guard.held("image-x")
    finally:
        release.set()
        thread.join(timeout=DEADLINE)
    assert seen == [True] and not thread.is_alive()
    with guard.hold("image-x") as got:
        assert got is True


_HOLDER = textwrap.dedent(
    """
    import sys
    from fedimg.locks import Guard
    with Guard(sys.argv[1]).hold(sys.argv[2]) as got:
        sys.stdout.write(("held" if got else "busy") + "\\n"); sys.stdout.flush()
        sys.stdin.readline()
    sys.stdout.write("released\\n"); sys.stdout.flush()
    """
)


@contextlib.contextmanager
def _holder(guard: Guard, key: str) -> Iterator[subprocess.Popen[str]]:
    """A child process holding (or trying to hold) ``key`` until told to let go."""
    child = _python(_HOLDER, str(guard.root.parent), key)
    try:
        yield child
    finally:
        if child.poll() is None:
            child.kill()
        child.wait(timeout=DEADLINE)


def test_two_processes_exclude_each_other(guard: Guard) -> None:
    with _holder(guard, "image-y") as child:
        _expect(child, "held")
        with guard.hold("image-y") as got:
            assert got is False
        assert child.stdin is not None
        child.stdin.write("done\n")
        child.stdin.flush()
        _expect(child, "released")
        assert child.wait(timeout=DEADLINE) == 0
    with guard.hold("image-y") as got:
        assert got is True
        with _holder(guard, "image-y") as child:  # and the other way round
            _expect(child, "busy")


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM])
def test_a_lock_is_released_when_its_holder_dies(guard: Guard, signum: int) -> None:
    with _holder(guard, "ami-0123456789abcdef0") as child:
        _expect(child, "held")
        assert guard.held("ami-0123456789abcdef0")
        child.send_signal(signum)
        assert child.wait(timeout=DEADLINE) == -signum
        with guard.hold("ami-0123456789abcdef0") as got:
            assert got is True  # nothing to clean up by hand


def test_keys_are_confined_to_the_lock_folder(guard: Guard, tmp_path: Path) -> None:
    for key in ("../../escape", "a/b", "", "x" * 500, "ami-1\x00"):
        with guard.hold(key) as got:
            assert got is True
    made = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert made and all(p.parent == guard.root for p in made)
    assert all(len(p.name) <= 205 for p in made)
    # Two keys that differ only in unsafe characters share a lock: safe, never unsafe.
    with guard.hold("a/b") as first, guard.hold("a_b") as second:
        assert first and not second


def test_status_lists_every_pending_compose_and_how_far_it_got(tmp_path: Path) -> None:
    from fedimg.status import pending_composes

    store = IntentStore(tmp_path)
    assert pending_composes(store) == []
    store.record(Intent("Fedora-41-20261124.0", "https://x/compose", last_error="404"))
    imgs = (image(1), image(2), image(3))
    store.record(
        Intent(
            "Fedora-41-20261124.1",
            "https://x/compose",
            images=imgs,
            staged=(imgs[0].sha256,),
            given_up={imgs[1].sha256: "404"},
        )
    )
    lines = pending_composes(store)
    assert lines == [
        "Fedora-41-20261124.0: metadata not read yet, 0 tries (404)",
        "Fedora-41-20261124.1: 1 staged, 1 given up, 1 to do, of 3 image(s)",
    ]
    assert pending_composes(store, "Fedora-41-20261124.1") == lines[1:]
    (tmp_path / "composes" / "Fedora-41-20261124.2.json").write_text("{not json")
    assert "unreadable intent" in pending_composes(store, "Fedora-41-20261124.2")[0]
