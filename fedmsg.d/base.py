"""A loopback development bus: one fedmsg-relay on 127.0.0.1, no signing.

Start it with ``fedmsg-relay`` and ``fedmsg-hub`` from this directory (fedmsg
reads ``./fedmsg.d/``). Production replaces this file with Fedora infra's
endpoints, ``environment = "prod"`` and ``validate_signatures = True``.
The ports below are only the defaults of a developer box; ``devel/`` and the
tests write their own config with free ports.
"""

config = {
    # Topics are <topic_prefix>.<environment>.<modname>.<topic>.
    "topic_prefix": "org.fedoraproject",
    "environment": "dev",
    # Publishers (the hub's consumers, fedmsg-logger, the CLIs) connect to the
    # relay's inbound socket instead of binding endpoints of their own.
    "active": True,
    "relay_inbound": ["tcp://127.0.0.1:9941"],
    "endpoints": {"relay_outbound": ["tcp://127.0.0.1:9940"]},
    "fedmsg.consumers.relay.enabled": True,
    # Development only: production signs and validates. There, set
    # "sign_messages": True, "validate_signatures": True, "crypto_backend": "x509",
    # "crypto_validate_backends": ["x509"], "ssldir": "/etc/pki/fedmsg",
    # "cert_prefix": "fedimg", "certnames": {"fedimg.<host>": "<cert basename>"},
    # "ca_cert_location", "crl_location" and a "routing_policy" naming who may send
    # pungi.compose.status.change and resultsdb.result.new. fedmsg 1.1 verifies
    # x509 only with M2Crypto, or pyOpenSSL < 24.3 with cryptography < 44; without
    # them every message is rejected. docs/security.md, "Message signatures".
    "sign_messages": False,
    "validate_signatures": False,
    "zmq_enabled": True,
    "post_init_sleep": 0.5,
    # One worker thread per consumer: on this box fedmsg-relay reads the same
    # config, and its RelayConsumer shares one zmq socket between workers (not
    # thread-safe). A production hub, on its own host, may raise this so that
    # several AMIs are tested at once (autocloud_ami.max_concurrent bounds it).
    "moksha.workers_per_consumer": 1,
    # fedmsg's default logging shows only the fedmsg and moksha loggers; without
    # these the hub drops fedimg's and autocloud_ami's work log.
    "logging": {
        "version": 1,
        "formatters": {
            "bare": {"format": "[%(asctime)s][%(name)10s %(levelname)7s] %(message)s"},
        },
        "handlers": {
            "console": {
                "class": "logging.StreamHandler",
                "formatter": "bare",
                "level": "INFO",
                "stream": "ext://sys.stdout",
            },
        },
        "loggers": {
            name: {"level": "INFO", "propagate": False, "handlers": ["console"]}
            for name in ("fedmsg", "moksha", "fedimg", "autocloud_ami")
        },
    },
}
