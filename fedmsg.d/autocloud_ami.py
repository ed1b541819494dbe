"""autocloud_ami: test each staged AMI on a throwaway EC2 instance, report to ResultsDB.

Every ``autocloud_ami.*`` key the consumer, the sweep producer and the
``autocloud-ami`` CLI read is listed here; unknown keys are refused at
start-up. The values below suit a developer box (loopback ResultsDB
stand-in, moto, the SSH stand-in); production overrides them in
/etc/fedmsg.d/. Times are seconds.
"""

config = {
    # Run the AmiTestConsumer and the SweepProducer in this fedmsg-hub.
    "autocloud_ami.enabled": False,
    # ResultsDB API v2.0 base URL (required). Every test result and the
    # autocloud.ami.all summary go there with the resultsdb_api client.
    "autocloud_ami.resultsdb_url": "http://127.0.0.1:5001/api/v2.0",
    # Where results that could not be posted (ResultsDB down, 5xx) wait, one
    # JSON file each, until the next sweep re-sends them in order. Results
    # ResultsDB refused (HTTP 400) land in <spool>/rejected/ for people.
    # Whatever is in it gets posted as a result: a directory only the hub's
    # user can write (not under a world-writable /tmp or /var/tmp).
    "autocloud_ami.resultsdb_spool": "/var/spool/autocloud_ami",
    # The client's retries (with exponential backoff) and per-request timeout.
    "autocloud_ami.resultsdb_retries": 3,
    "autocloud_ami.resultsdb_backoff": 1.0,
    "autocloud_ami.resultsdb_timeout": 30.0,
    # The runner's own address as a CIDR (required): the test instance's
    # security group allows tcp/22 from this only. One host (/32 or /128)
    # unless autocloud_ami.ssh_cidr_allow_wide is True; never 0.0.0.0/0.
    "autocloud_ami.ssh_cidr": "127.0.0.1/32",
    "autocloud_ami.ssh_cidr_allow_wide": False,
    # The scenarios: architecture -> the instance types every AMI of that
    # architecture is tested on, each on its own instance at the same time
    # (results carry data "scenario" = "<arch>:<type>", one autocloud.ami.all
    # summary per scenario). An AMI of an architecture not listed is refused.
    # Pick types that differ where images break: a Nitro type (NVMe root, ENA)
    # and a Xen type for x86_64, a Graviton type for aarch64. A type the
    # region does not offer (or has no capacity for) gives that scenario a
    # NEEDS_INSPECTION summary saying so. None: from instance_types below,
    # else {"x86_64": ["t3.small"], "aarch64": ["t4g.small"]}.
    "autocloud_ami.scenarios": {"x86_64": ["t3.small", "t2.small"], "aarch64": ["t4g.small"]},
    # The older form: one instance type per architecture ({"x86_64":
    # "t3.small", ...}, one scenario each). None: not set. Set with scenarios,
    # it must say the same, or the consumer does not start.
    "autocloud_ami.instance_types": None,
    # The images' default user the suite logs in as.
    "autocloud_ami.ssh_user": "fedora",
    # Launch into this subnet (its VPC gets the security group); None: the
    # default VPC. Without public addresses the runner must be in that VPC.
    "autocloud_ami.subnet_id": None,
    # DEVELOPMENT ONLY: "host:port" every instance's SSH connection goes to
    # instead of its address (the local SSH stand-in, devel/sshhost.py).
    # Must be None in production.
    "autocloud_ami.ssh_override": "127.0.0.1:2222",
    # Regions AMIs may be tested in; a request for another region is refused.
    "autocloud_ami.regions": ["us-east-1"],
    # At most this many AMIs are tested at once (the hub's
    # moksha.workers_per_consumer should be at least as large); a request
    # waits up to autocloud_ami.queue_timeout for a free slot. An AMI runs
    # one instance per scenario at once: up to max_concurrent times the
    # longest list of autocloud_ami.scenarios instances (mind the vCPU quota).
    "autocloud_ami.max_concurrent": 4,
    "autocloud_ami.queue_timeout": 14400.0,
    # Hard lifetime of a test instance: tagged autocloud:deadline, powered
    # off by itself then (autocloud_ami.self_destruct: a cloud-init boot
    # command; shutdown behaviour is terminate) and removed by the sweeper.
    "autocloud_ami.deadline": 3600.0,
    "autocloud_ami.self_destruct": True,
    # How long run_instances is retried on capacity/quota errors
    # (InsufficientInstanceCapacity, InstanceLimitExceeded, VcpuLimitExceeded...).
    "autocloud_ami.launch_retry_timeout": 300.0,
    # Deadlines: instance running; first SSH login (port open, key accepted);
    # each reboot of the suite; terminating and deleting everything.
    "autocloud_ami.boot_timeout": 600.0,
    "autocloud_ami.ssh_timeout": 600.0,
    "autocloud_ami.reboot_timeout": 600.0,
    "autocloud_ami.cleanup_timeout": 900.0,
    # How long to poll the console output for cloud-init's SSH host key
    # fingerprints (0: read it once). Found: the host key is verified
    # against them. Not found: refused if require_host_key, else the first
    # key seen is pinned and logged as unverified. moto prints none: 0 here.
    "autocloud_ami.host_key_wait": 0.0,
    "autocloud_ami.require_host_key": False,
    # Interval of every poll (instance state, console, group deletion, reboots).
    "autocloud_ami.poll_interval": 2.0,
    # Keep each test's output here, served from output_url (the results'
    # ref_url and the messages' results_url). None: output is not kept.
    "autocloud_ami.output_dir": None,
    "autocloud_ami.output_url": None,
    # The sweep producer: leaked-resource sweep and spool flush, every N s.
    "autocloud_ami.sweep_interval": 600.0,
    # botocore's adaptive retry attempts for every EC2 call.
    "autocloud_ami.aws_max_attempts": 10,
    # Extra tags on EVERY resource autocloud_ami creates (test instances, their
    # volumes, key pairs, security groups), e.g. the owner group Fedora's AWS
    # account policy asks for. At most 10; keys starting fedimg: or autocloud:,
    # and Name, are refused.
    "autocloud_ami.extra_tags": {"FedoraGroup": "cloud"},
}
