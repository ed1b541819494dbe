"""Build a ``fedimg.engine.Engine`` from the seams a test chooses (moto, fakes, a tmp state dir)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from fedimg.config import FedimgConfig
from fedimg.engine import Engine
from fedimg.http import make_session
from fedimg.intents import IntentStore
from fedimg.locks import Guard
from fedimg.messages import Emitter
from fedimg.promote import Promoter
from fedimg.results import DummyResults, ResultsSource
from fedimg.stage import Stager


def make_engine(
    cfg: FedimgConfig,
    emitter: Emitter,
    aws: Any,
    state_dir: Path,
    *,
    session: Any = None,
    results: ResultsSource | None = None,
    promoter: Promoter | None = None,
    stager: Stager | None = None,
    now: Callable[[], datetime] | None = None,
    **stager_kw: Any,
) -> Engine:
    """An engine whose every seam is given or built on ``aws`` (moto or a fake)."""
    stager = stager or Stager(
        cfg,
        emitter,
        aws,
        session or make_session(cfg.http_retries, cfg.http_timeout),
        **stager_kw,
    )
    promoter = promoter or Promoter(cfg, emitter, aws)
    extra: dict[str, Any] = {"now": now} if now is not None else {}
    return Engine(
        cfg,
        stager=stager,
        promoter=promoter,
        results=results if results is not None else DummyResults(),
        intents=IntentStore(state_dir),
        guard=Guard(state_dir),
        **extra,
    )
