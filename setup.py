"""Packaging for fedimg (stage/promote) and autocloud_ami (test) consumers."""

from setuptools import find_packages, setup

setup(
    name="fedimg",
    version="3.0.0.dev0",
    description="Stage Fedora cloud images as AMIs, test them, and release only what passed",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="AGPL-3.0-or-later",
    python_requires=">=3.11",
    packages=find_packages(include=["fedimg", "fedimg.*", "autocloud_ami", "autocloud_ami.*"]),
    include_package_data=True,
    install_requires=[
        "fedmsg>=1.1.7,<1.2",
        "psutil>=5.9",  # fedmsg.consumers imports it without declaring it
        "boto3>=1.34,<2",
        "botocore>=1.34,<2",
        "requests>=2.31,<3",
        "resultsdb_api>=2.1,<3",
        # Fedora's result conventions (the productmd.* data keys and groups); GPLv3+.
        "resultsdb_conventions>=3.0,<4",
        "productmd>=1.38,<2",
        "paramiko>=3.4,<6",
        "cryptography>=42",  # throwaway test-instance keys (autocloud_ami.instance)
        "jsonschema>=4.17,<5",
        "PyYAML>=6",  # the gate policy file (fedimg.gate.policy_file)
        # The second transport (AMQP/RabbitMQ), and the schemas of what is published:
        # fedimg-messages lives in ./fedimg-messages, install it from there in the same
        # pip run (`pip install ./fedimg-messages .`); fedora-image-uploader-messages
        # gives the fedora_image_uploader.published.v1.aws message its schema header.
        "fedora-messaging>=3.7,<4",
        "fedimg-messages>=1.0,<2",
        "fedora-image-uploader-messages>=1.2,<2",
    ],
    extras_require={
        # moksha loads consumers with pkg_resources, which resolves the entry
        # point's distribution requirements and cannot find dotted names such as
        # "moksha.hub"/"moksha.common" against their underscore dist-info. So the
        # hub runtime is an extra: `pip install fedimg[hub]` (the Makefile does).
        # fedmsg and moksha import pkg_resources without declaring it; setuptools 81
        # and later no longer ship it.
        "hub": ["moksha.hub>=1.5.17,<1.6", "setuptools>=65,<81"],
        "test": [
            # pytest 9.2 derives a test's nodeid from a new field, and pytest-xdist 3.8's
            # loadgroup still renames the old one: its groups would be silently ignored.
            "pytest>=8,<9.2",
            "pytest-timeout>=2.3,<3",  # every test has a deadline (pyproject: timeout)
            "pytest-xdist>=3.5,<4",  # make test: workers, --dist loadgroup (tests/conftest.py)
            "hypothesis>=6.100,<7",
            "moto[server,ec2,ebs]>=5.2,<5.3",
            "PyYAML>=6",  # the self-destruct cloud-config is parsed as cloud-init would
            "flask>=3,<4",
            "ruff>=0.6",
            "mypy>=1.10",
            "types-requests",
            "types-paramiko",
            "types-PyYAML",
        ],
    },
    entry_points={
        "moksha.consumer": [
            "fedimg_stage = fedimg.consumers:StageConsumer",
            "fedimg_promote = fedimg.consumers:PromoteConsumer",
            "fedimg_health = fedimg.consumers:HealthConsumer",
            "autocloud_ami = autocloud_ami.consumer:AmiTestConsumer",
        ],
        "moksha.producer": [
            "fedimg_reconcile = fedimg.consumers:ReconcileProducer",
            "fedimg_prune = fedimg.consumers:PruneProducer",
            "fedimg_audit = fedimg.consumers:AuditProducer",
            "autocloud_ami_sweep = autocloud_ami.consumer:SweepProducer",
        ],
        "console_scripts": [
            "fedimg = fedimg.cli:main",
            "autocloud-ami = autocloud_ami.cli:main",
        ],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
    ],
)
