"""fedmsg signature validation (``validate_signatures``) in front of fedimg's consumers.

A consumer is built with a fake hub whose config turns validation on, in
moksha's blocking mode, and messages go through ``FedmsgConsumer._consume``
exactly as the hub delivers them: ``validate()`` first, then ``consume()``.

- Unsigned messages, and messages whose signature does not verify, are
  dropped before any fedimg code runs; with validation off the same messages
  are handled (so these tests can fail).
- x509 (what Fedora's bus uses): a CA, a service certificate and a signature
  made here with ``cryptography`` the way fedmsg's ``x509_ng.sign`` makes it.
  fedmsg 1.1.7 verifies x509 only with pyOpenSSL < 24.3 (it imports
  ``OpenSSL.crypto.load_crl``, removed in 24.3; pyOpenSSL <= 24.2 requires
  cryptography < 44) or with M2Crypto. This environment has neither (it has
  cryptography 50), so fedmsg installs ``_disabled_validate``: every message
  is REJECTED - validation fails closed, never open. The test asserts
  acceptance when a working backend is importable and rejection otherwise
  (docs/security.md, "Message signatures").
- GnuPG, the other fedmsg backend, works here: a key generated in a
  temporary GNUPGHOME signs a message that the consumer then accepts, while a
  tampered message and one signed by an unknown key are dropped.
"""

from __future__ import annotations

import base64
import copy
import datetime
import json
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fedmsg.crypto
import fedmsg.crypto.x509
import fedmsg.encoding
import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

from fedimg.consumers import HealthConsumer, StageConsumer
from fedimg.messages import Emitter
from tests.conftest import Recorder

# fedmsg warns once per call that x509 validation is unavailable here (see the docstring).
pytestmark = pytest.mark.filterwarnings("ignore:Message signature validation is disabled")

PREFIX, ENV = "org.fedoraproject", "prod"
PING = f"{PREFIX}.{ENV}.fedimg.hub.ping"
COMPOSE = f"{PREFIX}.{ENV}.pungi.compose.status.change"


class FakeHub:
    """What ``FedmsgConsumer``/moksha's ``Consumer`` need from a hub."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.subscribed: list[str] = []

    def subscribe(self, topic: str, callback: Any) -> None:
        self.subscribed.append(topic)


def hub_config(validate: bool, **crypto: Any) -> dict[str, Any]:
    return {
        "topic_prefix": PREFIX,
        "environment": ENV,
        "validate_signatures": validate,
        "moksha.blocking_mode": True,  # consume in the calling thread, no workers
        "fedimg.health.enabled": True,
        "fedimg.stage.enabled": True,
        "fedimg.resultsdb_url": "http://127.0.0.1:9/api/v2.0",
        "fedimg.state_dir": tempfile.mkdtemp(prefix="fedimg-signatures-"),
        **crypto,
    }


@pytest.fixture(autouse=True)
def fresh_crypto_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """fedmsg.crypto picks its backends once per process: let each test choose again."""
    monkeypatch.setattr(fedmsg.crypto, "_implementation", None)
    monkeypatch.setattr(fedmsg.crypto, "_validate_implementations", None)


def health_consumer(config: dict[str, Any], recorder: Recorder) -> HealthConsumer:
    consumer = HealthConsumer(FakeHub(config))
    consumer.emitter = Emitter(recorder)  # the bus seam: nothing leaves this process
    return consumer


def envelope(topic: str, msg: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """A fedmsg message as the hub hands it to a consumer: ``{"topic", "body": envelope}``."""
    body = {
        "topic": topic,
        "msg": msg,
        "msg_id": "2026-0f5b7d1c-5a6e-4c6b-9d2e-0123456789ab",
        "timestamp": 1764000000.0,
        "i": 1,
        "username": "fedmsg",
        **extra,
    }
    return {"topic": topic, "body": body}


def pongs(recorder: Recorder) -> list[dict[str, Any]]:
    return recorder.bodies("fedimg.hub.pong")


# -- unsigned messages ---------------------------------------------------------------------------


def test_validation_is_read_from_the_hub_config(recorder: Recorder) -> None:
    assert health_consumer(hub_config(True), recorder).validate_signatures is True
    assert health_consumer(hub_config(False), recorder).validate_signatures is False


def test_unsigned_message_is_dropped_when_validation_is_on(recorder: Recorder) -> None:
    consumer = health_consumer(hub_config(True), recorder)
    assert consumer.hub.subscribed == [PING]
    consumer._consume(envelope(PING, {"token": "abc"}))
    assert pongs(recorder) == []
    # The same message with validation off is answered: the drop above was the validation.
    open_consumer = health_consumer(hub_config(False), recorder)
    open_consumer._consume(envelope(PING, {"token": "abc"}))
    assert [p["token"] for p in pongs(recorder)] == ["abc"]


@pytest.mark.parametrize(
    "extra",
    [
        {"crypto": "x509", "signature": "AAAA", "certificate": "AAAA"},
        {"crypto": "gpg", "signature": "AAAA"},
        {"crypto": "rot13", "signature": "AAAA"},
        {"signature": "not base64 at all ***"},
    ],
)
def test_forged_signature_fields_do_not_pass(recorder: Recorder, extra: dict[str, Any]) -> None:
    config = hub_config(
        True, crypto_backend="x509", crypto_validate_backends=["x509"], gpg_home="/nonexistent"
    )
    consumer = health_consumer(config, recorder)
    consumer._consume(envelope(PING, {"token": "abc"}, **extra))
    assert pongs(recorder) == []


def test_topic_envelope_mismatch_is_dropped(recorder: Recorder) -> None:
    consumer = health_consumer(hub_config(True), recorder)
    message = envelope(PING, {"token": "abc"})
    message["body"]["topic"] = f"{PREFIX}.{ENV}.fedimg.other"
    consumer._consume(message)
    assert pongs(recorder) == []


class FakeEngine:
    def __init__(self) -> None:
        self.staged: list[Any] = []

    def accept_compose(self, status: Any) -> list[Any]:
        self.staged.append(status)
        return []


@pytest.fixture
def compose_body() -> dict[str, Any]:
    return {
        "status": "FINISHED",
        "compose_id": "Fedora-40-20240501.0",
        "location": "https://kojipkgs.fedoraproject.org/compose/40/Fedora-40-20240501.0/compose",
        "release_version": "40",
        "release_short": "Fedora",
        "release_type": "ga",
        "compose_type": "production",
    }


@pytest.mark.parametrize("validate", [True, False])
def test_an_unsigned_compose_stages_nothing_when_validation_is_on(
    recorder: Recorder, compose_body: dict[str, Any], validate: bool
) -> None:
    consumer = StageConsumer(FakeHub(hub_config(validate)))
    consumer.lifecycle.close()  # the real engine's pool; a fake records instead of staging
    engine = FakeEngine()
    consumer.lifecycle = engine
    consumer._consume(envelope(COMPOSE, compose_body))
    assert len(engine.staged) == (0 if validate else 1)


# -- x509, as Fedora signs -------------------------------------------------------------------------


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(
    subject: str, key: rsa.RSAPrivateKey, issuer: str, issuer_key: rsa.RSAPrivateKey, ca: bool
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .sign(issuer_key, hashes.SHA256())
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A CA and a service certificate signed by it, as fedmsg's ssldir would hold them."""
    ssldir = tmp_path_factory.mktemp("ssldir")
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca = _cert("fedmsg test CA", ca_key, "fedmsg test CA", ca_key, ca=True)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = _cert("pungi-test.example.invalid", key, "fedmsg test CA", ca_key, ca=False)
    (ssldir / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    return {"ssldir": ssldir, "key": key, "cert": cert}


def x509_sign(body: dict[str, Any], key: rsa.RSAPrivateKey, cert: x509.Certificate) -> None:
    """What fedmsg.crypto.x509_ng.sign does: PKCS#1 v1.5 SHA-1 over the encoded envelope."""
    body["crypto"] = "x509"
    signature = key.sign(
        fedmsg.encoding.dumps(body).encode("utf-8"), padding.PKCS1v15(), hashes.SHA1()
    )
    body["signature"] = base64.b64encode(signature).decode("ascii")
    pem = cert.public_bytes(serialization.Encoding.PEM)
    body["certificate"] = base64.b64encode(pem).decode("ascii")


def x509_verifies(body: dict[str, Any], cert: x509.Certificate) -> bool:
    """The signature check of fedmsg.crypto.x509_ng.validate, done here with cryptography."""
    signature = base64.b64decode(body["signature"])
    payload = fedmsg.encoding.dumps(fedmsg.crypto.strip_credentials(body)).encode("utf-8")
    public = cert.public_key()
    assert isinstance(public, rsa.RSAPublicKey)
    try:
        public.verify(signature, payload, padding.PKCS1v15(), hashes.SHA1())
    except InvalidSignature:
        return False
    return True


def x509_backend_available() -> bool:
    return fedmsg.crypto.x509.validate is not fedmsg.crypto.x509._disabled_validate


def test_x509_signed_message_is_accepted_only_where_fedmsg_can_verify_it(
    recorder: Recorder, pki: dict[str, Any]
) -> None:
    config = hub_config(
        True,
        crypto_backend="x509",
        crypto_validate_backends=["x509"],
        ssldir=str(pki["ssldir"]),
        ca_cert_location=str(pki["ssldir"] / "ca.crt"),
        crl_location=None,
        routing_policy={PING: ["pungi-test.example.invalid"]},
        routing_nitpicky=True,
    )
    consumer = health_consumer(config, recorder)
    signed = envelope(PING, {"token": "signed"})
    x509_sign(signed["body"], pki["key"], pki["cert"])
    tampered = copy.deepcopy(signed)
    tampered["body"]["msg"]["token"] = "tampered"
    # A working backend would accept exactly the first: the signatures are real.
    assert x509_verifies(signed["body"], pki["cert"])
    assert not x509_verifies(tampered["body"], pki["cert"])
    consumer._consume(tampered)
    consumer._consume(signed)
    tokens = [p["token"] for p in pongs(recorder)]
    if x509_backend_available():
        assert tokens == ["signed"]
    else:
        # No pyOpenSSL/M2Crypto fedmsg can use: validation fails closed.
        assert tokens == []


def test_this_environment_cannot_verify_x509_which_is_why_it_fails_closed() -> None:
    """Pins the reason above; fails (and asks for the docs to change) once that changes."""
    try:
        import OpenSSL.crypto

        has_load_crl = hasattr(OpenSSL.crypto, "load_crl")
    except ImportError:
        has_load_crl = False
    assert x509_backend_available() == (has_load_crl or fedmsg.crypto.x509._m2crypto)
    assert fedmsg.crypto.validate({"crypto": "x509", "signature": "", "certificate": ""}) in (
        False,
        None,
    )


# -- GnuPG: a working backend here, so the accepting path is exercised too -----------------------


def _gpg(home: Path, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["gpg", "--homedir", str(home), "--batch", "--pinentry-mode", "loopback", *args],
        input=stdin,
        capture_output=True,
        timeout=60,
        check=True,
    )


@pytest.fixture
def gpg_home() -> Iterator[tuple[Path, str]]:
    """A throwaway GNUPGHOME (short path: gpg-agent's socket lives in it) with one key."""
    home = Path(tempfile.mkdtemp(prefix="fgpg", dir="/tmp"))
    home.chmod(0o700)
    try:
        _gpg(home, "--passphrase", "", "--quick-gen-key", "fedimg test", "ed25519", "sign", "1d")
        listing = _gpg(home, "--list-secret-keys", "--with-colons").stdout.decode()
        fingerprint = next(ln.split(":")[9] for ln in listing.splitlines() if ln.startswith("fpr"))
        yield home, fingerprint
    finally:
        # gpg started an agent for this home: stop it, then remove the home.
        subprocess.run(
            ["gpgconf", "--homedir", str(home), "--kill", "all"], timeout=30, check=False
        )
        shutil.rmtree(home, ignore_errors=True)


def gpg_sign(body: dict[str, Any], home: Path, fingerprint: str) -> dict[str, Any]:
    signed = fedmsg.crypto.gpg.sign(dict(body), gpg_home=str(home), gpg_signing_key=fingerprint)
    signed["signature"] = signed["signature"].decode("ascii")  # as it arrives through JSON
    return dict(json.loads(json.dumps(signed)))


@pytest.mark.integration
def test_gpg_signed_message_is_accepted_and_a_tampered_or_foreign_one_is_not(
    recorder: Recorder, gpg_home: tuple[Path, str], tmp_path: Path
) -> None:
    home, fingerprint = gpg_home
    config = hub_config(
        True, crypto_backend="gpg", crypto_validate_backends=["gpg"], gpg_home=str(home)
    )
    consumer = health_consumer(config, recorder)
    good = envelope(PING, {"token": "good"})
    good["body"] = gpg_sign(good["body"], home, fingerprint)
    tampered = copy.deepcopy(good)
    tampered["body"]["msg"]["token"] = "tampered"
    consumer._consume(tampered)
    consumer._consume(good)
    assert [p["token"] for p in pongs(recorder)] == ["good"]
    # Signed correctly, but by a key this hub's keyring does not hold.
    stranger_home = Path(tempfile.mkdtemp(prefix="fgpg", dir="/tmp"))
    stranger_home.chmod(0o700)
    try:
        _gpg(stranger_home, "--passphrase", "", "--quick-gen-key", "x", "ed25519", "sign", "1d")
        listing = _gpg(stranger_home, "--list-secret-keys", "--with-colons").stdout.decode()
        stranger = next(ln.split(":")[9] for ln in listing.splitlines() if ln.startswith("fpr"))
        foreign = envelope(PING, {"token": "foreign"})
        foreign["body"] = gpg_sign(foreign["body"], stranger_home, stranger)
    finally:
        subprocess.run(
            ["gpgconf", "--homedir", str(stranger_home), "--kill", "all"], timeout=30, check=False
        )
        shutil.rmtree(stranger_home, ignore_errors=True)
    consumer._consume(foreign)
    assert [p["token"] for p in pongs(recorder)] == ["good"]
