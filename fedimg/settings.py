"""Read a namespace of the fedmsg config into a typed, validated dataclass.

Each project package declares its settings as a frozen dataclass whose fields
carry the fedmsg config key in their metadata::

    @dataclass(frozen=True)
    class Cfg:
        staging_region: str = setting("fedimg.aws.staging_region", "us-east-1")

``load(Cfg, raw, namespace="fedimg")`` then checks every key under the
namespace: unknown keys, missing required keys and wrong types all raise
``ConfigError`` at start-up, naming the key. Nothing is read at import time.
A fedora-messaging consumer keeps the same keys in its TOML's
``[consumer_config]``; ``load_consumer_config`` reads them with the same checks.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import types
import typing
from collections.abc import Callable, Collection, Mapping
from typing import Any, TypeVar

_MISSING = dataclasses.MISSING
T = TypeVar("T")


class ConfigError(ValueError):
    """The fedmsg config does not describe a runnable setup."""


def setting(key: str, default: Any = _MISSING, *, doc: str = "") -> Any:
    """Declare a dataclass field read from the fedmsg config key ``key``."""
    meta = {"key": key, "doc": doc}
    if default is _MISSING:
        return dataclasses.field(metadata=meta)
    if isinstance(default, list | dict):
        factory: Callable[[], Any] = lambda: type(default)(default)  # noqa: E731
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def keys_of(cls: type) -> dict[str, str]:
    """Map each config key declared by ``cls`` to its field name."""
    return {f.metadata["key"]: f.name for f in dataclasses.fields(cls) if "key" in f.metadata}


def _check_type(key: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            try:
                return _check_type(key, value, arg)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {hint}, got {type(value).__name__} {value!r}")
    if hint is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}: expected null, got {value!r}")
    if hint is Any:
        return value
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        item = args[0] if args else Any
        checked = [_check_type(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
        return tuple(checked) if origin is tuple else checked
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        kt, vt = args or (Any, Any)
        return {
            _check_type(f"{key} key", k, kt): _check_type(f"{key}[{k!r}]", v, vt)
            for k, v in value.items()
        }
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, bool):
        raise ConfigError(f"{key}: expected int, got bool {value!r}")
    if isinstance(hint, type) and not isinstance(value, hint):
        raise ConfigError(f"{key}: expected {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


def load(cls: type[T], raw: Mapping[str, Any], namespace: str) -> T:
    """Build ``cls`` from the fedmsg config mapping ``raw``.

    Every key starting with ``namespace + "."`` must be declared by ``cls``.
    """
    known = keys_of(cls)
    prefix = namespace + "."
    unknown = sorted(k for k in raw if k.startswith(prefix) and k not in known)
    if unknown:
        raise ConfigError(f"unknown {namespace} settings: {', '.join(unknown)}")
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        key = field.metadata.get("key")
        if key is None:
            continue
        if key in raw:
            values[field.name] = _check_type(key, raw[key], hints[field.name])
        elif field.default is _MISSING and field.default_factory is _MISSING:
            raise ConfigError(f"missing required setting {key}")
    try:
        return cls(**values)
    except ValueError as exc:  # __post_init__ checks
        raise ConfigError(str(exc)) from exc


def flatten_keys(
    raw: Mapping[str, Any], known: Collection[str], prefix: str = ""
) -> dict[str, Any]:
    """Dotted keys from TOML tables: ``{"fedimg": {"stage": {"enabled": true}}}`` and
    ``{"fedimg.stage.enabled": true}`` both give ``{"fedimg.stage.enabled": True}``.

    A path that is a ``known`` key stops there (a mapping setting keeps its
    table); anything else nests down to its leaves, so a misspelt table still
    ends as an unknown key. A key given both ways raises ConfigError.
    """
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        full = f"{prefix}{key}"
        if full in known or not isinstance(value, Mapping) or not value:
            items = {full: value}.items()
        else:
            items = flatten_keys(value, known, full + ".").items()
        for name, item in items:
            if name in flat:
                raise ConfigError(f"{name}: set twice (a quoted key and a table)")
            flat[name] = item
    return flat


def load_consumer_config(cls: type[T], consumer_config: Mapping[str, Any], namespace: str) -> T:
    """Build ``cls`` from a fedora-messaging ``[consumer_config]`` table.

    The same keys as the fedmsg config and the same checks as ``load``; and
    since the table belongs to this one consumer, a key outside ``namespace``
    (``fedmig.stage.enabled``) is refused as unknown too.
    """
    if not isinstance(consumer_config, Mapping):
        raise ConfigError(
            f"consumer_config: expected a table, got {type(consumer_config).__name__}"
        )
    flat = flatten_keys(consumer_config, keys_of(cls))
    foreign = sorted(k for k in flat if not k.startswith(namespace + "."))
    if foreign:
        raise ConfigError(
            f"unknown consumer_config settings: {', '.join(foreign)} "
            f"(this consumer reads only {namespace}.* keys)"
        )
    return load(cls, flat, namespace)


def load_fedmsg_config() -> dict[str, Any]:
    """The merged fedmsg config, as fedmsg-hub reads it, for the CLIs.

    fedmsg 1.1's ``load_config`` reads /etc/fedmsg.d, ~/.fedmsg.d and
    ./fedmsg.d but ignores ``$FEDMSG_CONFIG``; here ``$FEDMSG_CONFIG`` (a file
    or a directory of ``*.py``), when set, is used instead of those.
    """
    import fedmsg.config

    filenames = None
    location = os.environ.get("FEDMSG_CONFIG")
    if location:
        if os.path.isdir(location):
            filenames = sorted(
                os.path.join(location, name)
                for name in os.listdir(location)
                if name.endswith(".py")
            )
        else:
            filenames = [location]
        if not filenames:
            raise ConfigError(f"FEDMSG_CONFIG={location} holds no fedmsg config file")
    return dict(fedmsg.config.load_config([], None, filenames=filenames, invalidate_cache=True))


def setup_cli_logging(verbose: bool) -> None:
    """Log lines on stderr for the command-line tools; the AWS/HTTP libraries quieter."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer", "paramiko"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
