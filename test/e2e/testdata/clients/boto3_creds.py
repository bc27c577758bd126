"""boto3's default credential chain, as a program on an instance runs it: with nothing
else configured, credentials come from IMDS. Prints one JSON line: the key id, or the
error."""
import json
import sys

import boto3

try:
    creds = boto3.session.Session(region_name="us-east-1").get_credentials()
except Exception as e:  # what the program would see
    print(json.dumps({"error": "%s: %s" % (type(e).__name__, e)}))
    sys.exit(1)
if creds is None:
    print(json.dumps({"error": "no credentials"}))
    sys.exit(1)
print(json.dumps({"access_key_id": creds.get_frozen_credentials().access_key}))
