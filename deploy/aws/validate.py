#!/usr/bin/env python3
"""Offline checks of deploy/aws/sluice.yaml (no AWS account or cfn-lint needed).

- The file parses as YAML, with CloudFormation's short-form tags (!Ref, !Sub, ...).
- Every Ref, GetAtt and ${...} in a Sub names a parameter, resource or pseudo parameter; every
  condition used is defined; every parameter is used.
- The user data, rendered with sample parameter values, is valid bash (bash -n) and embeds the
  same systemd unit as deploy/systemd/sluice.service (directives compared, comments ignored).
- The programs in the user data that format the secrets work on sample secrets.
- The sluice.toml the user data writes is TOML with only keys Sluice knows (the fields of
  `Config` in proxy/src/config.rs), and verifies TLS toward the database by default.

Usage: python3 deploy/aws/validate.py [TEMPLATE]
"""

import pathlib
import re
import subprocess
import sys

import yaml

HERE = pathlib.Path(__file__).resolve().parent
TEMPLATE = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "sluice.yaml"
UNIT = HERE.parent / "systemd" / "sluice.service"
CONFIG_RS = HERE.parent.parent / "proxy" / "src" / "config.rs"

PSEUDO = {
    "AWS::AccountId", "AWS::NoValue", "AWS::NotificationARNs", "AWS::Partition", "AWS::Region",
    "AWS::StackId", "AWS::StackName", "AWS::URLSuffix",
}
TAGS = ["Ref", "Sub", "GetAtt", "If", "Not", "Equals", "And", "Or", "Join", "Select", "Split",
        "Base64", "FindInMap", "GetAZs", "ImportValue", "Condition", "Cidr"]


class Tagged:
    def __init__(self, tag, value):
        self.tag, self.value = tag, value


class Loader(yaml.SafeLoader):
    pass


def _construct(tag):
    def f(loader, node):
        if isinstance(node, yaml.ScalarNode):
            value = loader.construct_scalar(node)
        elif isinstance(node, yaml.SequenceNode):
            value = loader.construct_sequence(node, deep=True)
        else:
            value = loader.construct_mapping(node, deep=True)
        return Tagged(tag, value)
    return f


for t in TAGS:
    Loader.add_constructor("!" + t, _construct(t))

errors = []


def walk(node, visit):
    visit(node)
    if isinstance(node, Tagged):
        walk(node.value, visit)
    elif isinstance(node, dict):
        for k, v in node.items():
            walk(k, visit)
            walk(v, visit)
    elif isinstance(node, list):
        for v in node:
            walk(v, visit)


def normalise(node):
    """Long form (Fn::Sub, Ref) to Tagged, so one walker handles both."""
    if isinstance(node, dict) and len(node) == 1:
        (k, v), = node.items()
        if k == "Ref" or (k.startswith("Fn::") and k[4:] in TAGS):
            return Tagged(k[4:] if k.startswith("Fn::") else k, normalise(v))
    if isinstance(node, dict):
        return {k: normalise(v) for k, v in node.items()}
    if isinstance(node, list):
        return [normalise(v) for v in node]
    if isinstance(node, Tagged):
        return Tagged(node.tag, normalise(node.value))
    return node


def sub_names(text):
    return [m for m in re.findall(r"\$\{([^}!][^}]*)\}", text)]


def render_sub(text, values):
    def repl(m):
        name = m.group(1)
        if name.startswith("!"):
            return "${" + name[1:] + "}"
        if name in values:
            return str(values[name])
        if "." in name:
            return "10.0.1.23"
        return values.get(name, "X")
    return re.sub(r"\$\{([^}]*)\}", repl, text)


def unit_directives(text):
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or line.startswith(";"):
            continue
        if line.startswith("Documentation="):
            continue
        out.append(line)
    return out


def main():
    doc = normalise(yaml.load(TEMPLATE.read_text(), Loader=Loader))
    params = doc.get("Parameters", {})
    resources = doc.get("Resources", {})
    conditions = doc.get("Conditions", {})
    known = set(params) | set(resources) | PSEUDO
    used_params = set()

    def check_ref(name, where):
        if name not in known:
            errors.append(f"{where}: unknown reference {name!r}")
        if name in params:
            used_params.add(name)

    def visit(node):
        if not isinstance(node, Tagged):
            return
        if node.tag == "Ref":
            check_ref(node.value, "Ref")
        elif node.tag == "GetAtt":
            res = node.value.split(".")[0] if isinstance(node.value, str) else node.value[0]
            if res not in resources:
                errors.append(f"GetAtt: unknown resource {res!r}")
        elif node.tag == "Sub":
            if isinstance(node.value, list):
                text, local = node.value[0], set(node.value[1])
            else:
                text, local = node.value, set()
            for name in sub_names(text):
                base = name.split(".")[0]
                if name in local:
                    continue
                if "." in name and base in resources:
                    continue
                check_ref(name, "Sub")
        elif node.tag == "If":
            if node.value[0] not in conditions:
                errors.append(f"If: unknown condition {node.value[0]!r}")
        elif node.tag == "Condition":
            if node.value not in conditions:
                errors.append(f"Condition: unknown condition {node.value!r}")

    walk(doc.get("Resources"), visit)
    walk(doc.get("Outputs"), visit)
    walk(doc.get("Conditions"), visit)
    walk(doc.get("Rules"), visit)
    for name, res in resources.items():
        if "Type" not in res:
            errors.append(f"resource {name} has no Type")
        cond = res.get("Condition")
        if cond is not None and cond not in conditions:
            errors.append(f"resource {name}: unknown condition {cond!r}")
    for name in params:
        if name not in used_params:
            errors.append(f"parameter {name} is never used")

    # Render the user data with sample values and check it.
    user_data = resources["Instance"]["Properties"]["UserData"]
    assert isinstance(user_data, Tagged) and user_data.tag == "Base64", "UserData: Fn::Base64 expected"
    sub = user_data.value
    assert isinstance(sub, Tagged) and sub.tag == "Sub", "UserData: Fn::Sub expected"
    text, local = sub.value
    values = {k: v.get("Default", f"sample-{k}") for k, v in params.items()}
    values.update({"AWS::StackName": "sluice", "AWS::Region": "us-east-1", "AWS::Partition": "aws",
                   "DbPasswordSecretArn": "arn:aws:secretsmanager:us-east-1:1:secret:x",
                   "DbHost": "db.internal", "BinaryS3Bucket": "bucket", "BinaryS3Key": "sluice"})
    values.update(local)
    script = render_sub(text, values)
    r = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True)
    if r.returncode != 0:
        errors.append("user data is not valid bash: " + r.stderr.strip())
    if not script.startswith("#!/bin/bash\n"):
        errors.append("user data must start with #!/bin/bash")
    # The Python program that formats the secret, run on two sample secrets.
    m = re.search(r"python3 -c '\n(.*?)\n' >", script, re.S)
    if not m:
        errors.append("user data: secret formatting program not found")
    else:
        for secret, expect in [('{"username": "app", "password": "p\\"$`\\\\w"}', 'DB_PASSWORD="p\\"\\$\\`\\\\w"'),
                               ("plain-secret", 'DB_PASSWORD="plain-secret"')]:
            r = subprocess.run([sys.executable, "-c", m.group(1)], input=secret + "\n", text=True,
                               capture_output=True)
            if r.returncode != 0 or r.stdout.strip() != expect:
                errors.append(f"secret formatting: {secret!r} gave {r.stdout.strip()!r} {r.stderr.strip()}, "
                              f"expected {expect!r}")
    # The program that writes Sluice's certificate and key, run on a sample secret.
    m = re.search(r"python3 -c '\n((?:(?!\n')[\s\S])*)\n' /etc/sluice/tls\n", script)
    if not m:
        errors.append("user data: certificate secret program not found")
    else:
        import json, os, tempfile
        secret = json.dumps({"certificate": "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----",
                             "private_key": "-----BEGIN PRIVATE KEY-----\nAA==\n-----END PRIVATE KEY-----\n"})
        with tempfile.TemporaryDirectory() as d:
            r = subprocess.run([sys.executable, "-c", m.group(1), d], input=secret, text=True,
                               capture_output=True)
            crt, key = os.path.join(d, "sluice.crt.new"), os.path.join(d, "sluice.key.new")
            if r.returncode != 0 or not (os.path.exists(crt) and os.path.exists(key)):
                errors.append(f"certificate secret program failed: {r.stderr.strip()}")
            else:
                if oct(os.stat(key).st_mode & 0o777) != "0o640" or not open(key).read().endswith("KEY-----\n"):
                    errors.append("certificate secret program: the key file is not mode 0640 PEM")
                if not open(crt).read().startswith("-----BEGIN CERTIFICATE-----"):
                    errors.append("certificate secret program: the certificate file is not PEM")
            r = subprocess.run([sys.executable, "-c", m.group(1), d], input='{"certificate": "x", "private_key": "y"}',
                               text=True, capture_output=True)
            if r.returncode == 0:
                errors.append("certificate secret program accepted a secret without PEM")
    # sluice.toml: every heredoc written to it, with and without the client certificate lines.
    toml_text = "\n".join(re.findall(r"cat >>? /etc/sluice/sluice\.toml <<'EOF'\n(.*?)\nEOF\n", script, re.S))
    try:
        import tomllib
    except ImportError:  # Python < 3.11
        tomllib = None
    fields = set(re.findall(r"^    pub (\w+):", CONFIG_RS.read_text().split("pub struct Config {")[1].split("\n}")[0], re.M))
    if tomllib and fields:
        try:
            cfg = tomllib.loads(toml_text)
        except tomllib.TOMLDecodeError as e:
            errors.append(f"user data: sluice.toml is not TOML: {e}")
            cfg = {}
        unknown = sorted(set(cfg) - fields)
        if unknown:
            errors.append(f"user data: sluice.toml has keys Sluice does not know: {unknown}")
        if cfg and (cfg.get("server_tls") != "verify-full" or not cfg.get("server_tls_ca_file")):
            errors.append("user data: sluice.toml should verify the server (server_tls = verify-full, a CA file)")
    # The embedded unit matches deploy/systemd/sluice.service.
    embedded = unit_directives(local["ServiceUnit"])
    reference = unit_directives(UNIT.read_text())
    if embedded != reference:
        import difflib
        diff = "\n".join(difflib.unified_diff(reference, embedded, "deploy/systemd/sluice.service",
                                              "sluice.yaml ServiceUnit", lineterm=""))
        errors.append("the unit embedded in the user data differs from deploy/systemd/sluice.service:\n" + diff)
    # Literal ${VAR} for Sluice survive as ${VAR}.
    if "password = \"${DB_PASSWORD}\"" not in script:
        errors.append("user data: sluice.toml should reference ${DB_PASSWORD}")

    if errors:
        for e in errors:
            print(f"{TEMPLATE}: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"{TEMPLATE}: OK ({len(params)} parameters, {len(resources)} resources, "
          f"{len(doc.get('Outputs', {}))} outputs; user data passes bash -n)")


if __name__ == "__main__":
    main()
