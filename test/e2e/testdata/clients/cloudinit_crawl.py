"""cloud-init's EC2 data source crawling IMDS as it does at boot on AWS (platform AWS:
IMDSv2 token first, retries until max_wait). Argument: max_wait in seconds. Prints one
JSON line: the instance id and the number of failed attempts cloud-init logged, or the
error."""
import json
import logging
import sys
import tempfile

from cloudinit import distros, helpers
from cloudinit.sources import DataSourceEc2 as ec2


class AWS(ec2.DataSourceEc2):
    # The emulator serves only /latest/, where IMDS also serves dated API versions:
    # without this, cloud-init would fall back to 2009-04-04 and find nothing.
    min_metadata_version = "latest"
    extended_metadata_versions = []

    # identify_platform reads DMI, which says nothing of AWS here.
    def _get_cloud_name(self):
        return ec2.CloudNames.AWS


class Count(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.n = 0
        self.last = ""

    def emit(self, record):
        self.n += 1
        self.last = record.getMessage()


count = Count()
logging.getLogger().addHandler(count)
logging.getLogger().setLevel(logging.WARNING)
tmp = tempfile.mkdtemp()
paths = helpers.Paths({"cloud_dir": tmp, "run_dir": tmp})
sys_cfg = {"datasource": {"Ec2": {
    "max_wait": int(sys.argv[1]), "timeout": 2,
    "metadata_urls": ["http://169.254.169.254"],
}}}
distro = distros.fetch("debian")("debian", {}, paths)
ds = AWS(sys_cfg, distro, paths)
if not ds._get_data():
    print(json.dumps({"error": "no metadata: " + count.last, "warnings": count.n}))
    sys.exit(1)
creds = ds.metadata.get("iam", {}).get("security-credentials", {})
key = next(iter(creds.values()), {}).get("AccessKeyId", "")
print(json.dumps({"instance_id": ds.metadata["instance-id"], "access_key_id": key, "warnings": count.n}))
