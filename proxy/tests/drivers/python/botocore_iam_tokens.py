"""RDS IAM tokens from botocore, for proxy/tests/it/iam.rs to compare Sluice's with.

Reads one JSON object a line on stdin (region, host, port, user, key, secret, token or null,
time in Unix seconds) and prints botocore's generate_db_auth_token for each, one a line, then
"OK botocore <version>".

The clock: botocore (1.44.5, pinned in requirements.txt) takes the signing time from
botocore.auth.get_current_datetime, which is replaced here by one returning the case's time.
Patching that one name is enough and needs no freezegun; a botocore without it fails loudly
instead of signing with the real time.
"""

import datetime
import json
import sys

import botocore
import botocore.auth
import botocore.session

if not callable(getattr(botocore.auth, "get_current_datetime", None)):
    sys.exit(
        f"botocore {botocore.__version__} has no botocore.auth.get_current_datetime to fix the "
        "clock with: use the version in proxy/tests/drivers/python/requirements.txt"
    )

now = None  # the current case's time (naive UTC, as botocore uses it)


def fixed_datetime(remove_tzinfo=True):
    return now if remove_tzinfo else now.replace(tzinfo=datetime.timezone.utc)


botocore.auth.get_current_datetime = fixed_datetime

session = botocore.session.get_session()
for line in sys.stdin:
    if not line.strip():
        continue
    case = json.loads(line)
    now = datetime.datetime.fromtimestamp(case["time"], datetime.timezone.utc).replace(tzinfo=None)
    client = session.create_client(
        "rds",
        region_name=case["region"],
        aws_access_key_id=case["key"],
        aws_secret_access_key=case["secret"],
        aws_session_token=case["token"],
    )
    print(client.generate_db_auth_token(case["host"], case["port"], case["user"]))
print(f"OK botocore {botocore.__version__}")
