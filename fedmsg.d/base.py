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
    # Development only: production signs and validates (see README, Security).
    "sign_messages": False,
    "validate_signatures": False,
    "zmq_enabled": True,
    "post_init_sleep": 0.5,
    # One worker thread per consumer: on this box fedmsg-relay reads the same
    # config, and its RelayConsumer shares one zmq socket between workers (not
    # thread-safe). A production hub, on its own host, may raise this so that
    # several AMIs are tested at once (autocloud_ami.max_concurrent bounds it).
    "moksha.workers_per_consumer": 1,
}
