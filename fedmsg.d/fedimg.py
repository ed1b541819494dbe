"""fedimg's settings (every ``fedimg.*`` key of fedimg/config.py), for a developer box.

fedmsg-hub and the ``fedimg`` CLI read this with the rest of ``fedmsg.d/``;
fedimg validates the whole namespace at start-up (an unknown, missing or
mistyped key stops it with the key's name). Production overrides these in
/etc/fedmsg.d/fedimg.py: real regions, the ResultsDB URL, allowed hosts.
Keep this file in sync with fedimg/config.py (tests/test_stage.py checks it).
"""

import os

config = {
    # -- which consumers this hub runs -------------------------------------------
    # Stage: on pungi.compose.status.change FINISHED, upload the compose's cloud
    # raw.xz images as AMIs in the staging region and ask for tests.
    "fedimg.stage.enabled": True,
    # Promote: on ResultsDB's result.new (and WaiverDB's waiverdb.waiver.new: a
    # waiver may release a failed AMI), gate the AMI on its required tests,
    # then copy it to every region and make it public (or reject it).
    "fedimg.promote.enabled": True,
    # Health: answer fedimg.hub.ping with fedimg.hub.pong (monitoring, tests).
    "fedimg.health.enabled": True,
    # -- ResultsDB -------------------------------------------------------------
    # The API v2.0 base URL the gate reads test results from (required).
    "fedimg.resultsdb_url": "http://127.0.0.1:5001/api/v2.0",
    # -- WaiverDB ----------------------------------------------------------------
    # The API v1.0 base URL the gate reads waivers from (a waived FAILED counts as
    # passed; `fedimg waive` creates one). Empty: no waivers. While WaiverDB cannot
    # be read the gate waits (never releases on missing information).
    "fedimg.waiverdb_url": "",
    # -- AWS -------------------------------------------------------------------
    # The one region where new AMIs are registered and tested before release.
    "fedimg.aws.staging_region": "us-east-1",
    # The regions a released AMI is copied to (besides the staging region).
    # An empty list means every region the account can reach in its partition.
    "fedimg.aws.regions": ["us-east-2", "us-west-2", "eu-west-1"],
    # One AMI per image and volume type, all from the same snapshot. Root
    # volumes: gp3, gp2, io1, io2 or standard.
    "fedimg.aws.volume_types": ["gp3"],
    # Concurrent put_snapshot_block calls per image upload (memory is about
    # 2 x this x 512 KiB per image).
    "fedimg.aws.upload_workers": 16,
    # botocore attempts per AWS call (adaptive retry mode: throttling and 5xx
    # are retried with backoff).
    "fedimg.aws.max_attempts": 10,
    # Extra tags on EVERY resource fedimg creates (snapshots, AMIs, copies and
    # their snapshots), e.g. the owner group Fedora's AWS account policy asks
    # for. At most 10; keys starting fedimg: or autocloud:, and Name, are refused.
    "fedimg.aws.extra_tags": {"FedoraGroup": "cloud"},
    # -- the compose -------------------------------------------------------------
    # productmd variants holding cloud images (CloudImages: F26/F27, AtomicHost: F28+).
    "fedimg.compose.variants": ["Cloud", "AtomicHost", "CloudImages"],
    # Architectures to stage (x86_64 and/or aarch64).
    "fedimg.compose.arches": ["x86_64", "aarch64"],
    # Hosts a compose location may be on; empty allows any http(s) host.
    # Production: ["kojipkgs.fedoraproject.org"].
    "fedimg.compose.allowed_hosts": [],
    # The most cloud raw.xz images taken from one compose (in images.json order:
    # variant, arch, path). The rest are skipped, with one ERROR line saying how
    # many; a Fedora compose has a handful, so a hostile or broken images.json
    # listing thousands cannot keep the hub busy for hours.
    "fedimg.compose.max_images": 50,
    # -- staging -----------------------------------------------------------------
    # Images of a compose staged at once (each with upload_workers block writers);
    # shared by every compose this process handles.
    "fedimg.stage.workers": 2,
    # The largest raw image (GiB) fedimg turns into a snapshot. The size the
    # image's xz index claims is checked against it before anything is created in
    # AWS; Fedora's cloud images are 5-7 GiB raw. At most 16384 (EBS's largest volume).
    "fedimg.stage.max_volume_gib": 32,
    # HTTP read timeout (seconds) and retries (connection errors, 429, 5xx; never
    # 404) for compose metadata and image downloads. A download cut short is
    # resumed from the last byte received (HTTP Range) up to `retries` times,
    # with the same exponential backoff. Every request and redirect hop must go
    # to a host in fedimg.compose.allowed_hosts.
    "fedimg.http.timeout": 60.0,
    "fedimg.http.retries": 5,
    # A multi-block raw.xz (xz -T0 writes them) is fetched as byte ranges of
    # at least 8 MiB of raw data each, decoded in parallel: how many per image
    # at once (about the cores to spare; each holds one xz decoder, up to 24
    # MiB at xz -6, fewer run at once if bigger). Single-block files stream.
    "fedimg.download.xz_blocks_in_flight": 4,
    # -- the gate ----------------------------------------------------------------
    # ResultsDB testcases that must all be PASSED (latest result) for release.
    "fedimg.gate.required_testcases": ["autocloud.ami.all"],
    # The gate policy as data: a YAML file of rules (by release, subvariant, arch
    # and compose type) saying which testcases must pass in which scenarios
    # (fedimg/policy.py documents the format; `fedimg policy check FILE`
    # validates one). Read and checked once at start-up: an unknown key, a wrong
    # type, a rule that can never match or two contradicting rules stop fedimg
    # naming the file, rule and key. Empty: required_testcases must pass in every
    # scenario results exist for, for every image (the behaviour before policies).
    "fedimg.gate.policy_file": "",
    # Outcomes of a required testcase that reject the AMI.
    "fedimg.gate.reject_outcomes": ["FAILED", "NEEDS_INSPECTION"],
    # Seconds after staging without a verdict before the AMI is rejected.
    "fedimg.gate.deadline": 6 * 3600.0,
    # Seconds after staging with a required result still missing (a test run
    # lost to a crash or a lost message) before the reconcile pass asks for
    # the test ONCE more (fedimg.image.test started, tag fedimg:test-requested).
    # Keep it below the deadline, and above autocloud_ami's queue wait + run time.
    "fedimg.gate.retest_after": 3 * 3600.0,
    # Deregister rejected AMIs (and delete their snapshots) instead of keeping
    # them tagged fedimg:state=rejected for inspection.
    "fedimg.gate.delete_rejected": False,
    # -- promotion ---------------------------------------------------------------
    # Concurrent copy_image calls (AWS allows 25 per source region at once).
    "fedimg.promote.max_concurrent_copies": 25,
    # Seconds to wait for a copy to become available in its region.
    "fedimg.promote.copy_timeout": 3 * 3600.0,
    # Seconds to keep retrying making a copy public (InvalidAMIID.Unavailable).
    "fedimg.promote.publish_retry_timeout": 1800.0,
    # On release, also publish fedora_image_uploader.published.v1.aws.<subvariant>.
    # <release>.<arch> (the AwsPublishedV1 message Fedora's websites and tooling read
    # from datagrepper today), beside fedimg.image.release. False: do not. An image
    # whose release is not a number (Rawhide) is never announced that way.
    "fedimg.promote.fedora_image_uploader_message": True,
    # Days from staging until a released AMI (the staging AMI and every copy) is
    # deprecated, per compose type (productmd's: production, test, nightly, ci;
    # one left out keeps its default). Capped at AWS's limit for public AMIs:
    # 2 years (730 days) from creation.
    "fedimg.promote.deprecation_days": {"production": 730, "test": 30, "nightly": 14, "ci": 7},
    # Regions never copied to (nor checked), whether listed in fedimg.aws.regions
    # (a region taken out for a while) or discovered. Never the staging region;
    # never also a best-effort region.
    "fedimg.promote.skip_regions": [],
    # Regions whose failure (refused by the preflight check -- block public
    # access on, the public-AMI quota full -- or a failed copy) is reported in
    # fedimg.image.release's failed_regions but does not keep the image
    # promoting: it is released, and no later pass retries them.
    "fedimg.promote.best_effort_regions": [],
    # Time-based copies: every copy's snapshots complete within this many
    # minutes (CopyImage SnapshotCopyCompletionDurationMinutes; 15 to 2880, in
    # steps of 15; costs extra per GiB). 0: AWS's best-effort copies. Keep
    # fedimg.promote.copy_timeout above it.
    "fedimg.promote.copy_completion_minutes": 0,
    # -- reconcile ---------------------------------------------------------------
    # Seconds between passes resuming unfinished work from AWS tags and ResultsDB.
    "fedimg.reconcile.interval": 300.0,
    # Seconds before the reconcile pass touches what a crashed stage left in the
    # staging region (a snapshot without an AMI, an AMI without fedimg tags):
    # longer than any upload may take (uploads give up after 90 minutes).
    "fedimg.reconcile.orphan_grace": 2 * 3600.0,
    # -- after release: pruning -----------------------------------------------------
    # Seconds between prune runs in the hub (and the fedora-messaging consumer)
    # with fedimg.promote.enabled; 0 (the default): never, only `fedimg prune --apply`.
    # A run removes what `fedimg prune` (a dry run) lists: in every region, the AMIs
    # and snapshots of old composes. Only AMIs carrying fedimg's tags are ever seen.
    "fedimg.prune.interval": 0.0,
    # Per stream (release, subvariant, arch, compose type, volume type), the newest
    # released AMIs always kept, whatever their age. At least 1: the newest of a
    # stream is never removed.
    "fedimg.prune.keep": 3,
    # Days after staging before an older released nightly (or test/ci) compose's
    # AMIs are removed in every region.
    "fedimg.prune.nightly_days": 14.0,
    # Release -> its EOL date (YYYY-MM-DD, UTC): from that day an older released
    # production compose of the release is removed. A release not listed is kept.
    # Rejected AMIs go only with fedimg.gate.delete_rejected.
    "fedimg.prune.eol": {"38": "2024-05-21", "39": "2024-11-26"},
    # -- after release: the public-access audit ----------------------------------------
    # Seconds between checks that every released, not deprecated AMI and its
    # snapshots are still public in every region (AWS can make them private); 0
    # (the default): never, only `fedimg audit`. What is private is logged at ERROR.
    "fedimg.audit.interval": 0.0,
    # Make what the audit finds private public again (as `fedimg audit --fix`).
    "fedimg.audit.fix": False,
    # -- durable state -------------------------------------------------------------
    # Where accepted composes are remembered until every image is staged (one JSON
    # file per compose, written atomically) and where workers lock images and AMIs
    # (flock). Processes sharing it never stage an image or promote an AMI twice.
    # Must be writable by the hub's user; checked at start-up. Production:
    # /var/lib/fedimg (the default when the key is not set).
    "fedimg.state_dir": os.environ.get("FEDIMG_STATE_DIR", ".fedimg-state"),
    # Times an image of an accepted compose is tried (the message, then reconcile
    # passes) before it is given up and its compose's intent can be dropped.
    "fedimg.stage.max_attempts": 3,
}
