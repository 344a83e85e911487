#!/usr/bin/env bash
# Offline checks of the operator files in deploy/ and the scripts in benches/ (CI runs this in its
# "deploy checks" step). Needs promtool (Debian package prometheus) and python3 with PyYAML
# (python3-yaml); uses systemd-analyze when present. Takes a few seconds.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

ok() { printf '  ok  %s\n' "$*"; }

# Say what is missing and how to get it, rather than "command not found" half-way through.
need() {
    command -v "$1" >/dev/null 2>&1 && return
    echo "deploy/check.sh needs $1: $2" >&2
    exit 1
}
need promtool "apt-get install -y prometheus (Debian/Ubuntu), or put the promtool of a Prometheus release on PATH"
need python3 "apt-get install -y python3 python3-yaml"

# Prometheus: configuration, rules and the rules' unit tests.
promtool check config deploy/prometheus/prometheus.yml >/dev/null
ok "promtool check config deploy/prometheus/prometheus.yml"
promtool check rules deploy/prometheus/sluice-rules.yml >/dev/null
ok "promtool check rules deploy/prometheus/sluice-rules.yml"
promtool test rules deploy/prometheus/tests.yml >/dev/null
ok "promtool test rules deploy/prometheus/tests.yml"

# Debian's python3 has PyYAML (python3-yaml); another python3 first on PATH may not.
PY=python3
if [[ -x /usr/bin/python3 ]] && /usr/bin/python3 -c 'import yaml' 2>/dev/null; then PY=/usr/bin/python3; fi

# Grafana: well-formed JSON, and every panel query is about Sluice.
"$PY" - deploy/grafana/sluice-dashboard.json <<'EOF'
import json, sys
path = sys.argv[1]
d = json.load(open(path))
assert d.get("schemaVersion", 0) >= 36, "schemaVersion"
assert any(v.get("type") == "datasource" and v.get("query") == "prometheus"
           for v in d["templating"]["list"]), "no Prometheus data source variable"
ids, exprs = set(), 0
for p in d["panels"]:
    assert p["id"] not in ids, f"duplicate panel id {p['id']}"
    ids.add(p["id"])
    for t in p.get("targets", []):
        assert "sluice_" in t["expr"], f"{p['title']}: {t['expr']}"
        exprs += 1
print(f"  ok  {path}: valid JSON, {len(d['panels'])} panels, {exprs} queries")
EOF

# CloudFormation: YAML with CloudFormation tags, references, user data (bash -n), embedded unit.
"$PY" deploy/aws/validate.py | sed 's/^/  ok  /'

# Both templates pass cfn-lint (resource properties, types, references, regions).
CFN_LINT=${CFN_LINT:-cfn-lint}
need "$CFN_LINT" "python3 -m pip install -r deploy/aws/requirements.txt (.ci/run puts it in target/deploy-venv)"
"$CFN_LINT" deploy/aws/sluice.yaml deploy/aws/sluice-fleet.yaml
ok "cfn-lint deploy/aws/sluice.yaml deploy/aws/sluice-fleet.yaml ($("$CFN_LINT" --version))"

# The fleet template's container settings are keys Sluice knows, and it runs a fleet behind
# the PROXY protocol with a stop timeout and deregistration delay that fit the drain.
"$PY" - deploy/aws/sluice-fleet.yaml proxy/src/config.rs <<'EOF'
import re, sys
import yaml
class Loader(yaml.SafeLoader):
    pass
Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
t = yaml.load(open(sys.argv[1]), Loader=Loader)
src = open(sys.argv[2]).read().split("pub struct Config {")[1].split("\n}")[0]
fields = set(re.findall(r"^    pub (\w+):", src, re.M)) | {"upstream"}
c = t["Resources"]["TaskDefinition"]["Properties"]["ContainerDefinitions"][0]
env = {e["Name"]: e["Value"] for e in c["Environment"]}
keys = {k[len("SLUICE_"):].lower() for k in env if k.startswith("SLUICE_")}
unknown = sorted(keys - fields)
assert not unknown, f"{sys.argv[1]}: settings Sluice does not know: {unknown}"
assert {"fleet", "proxy_protocol"} <= keys, "the fleet template must set fleet and proxy_protocol"
props = t["Resources"]["TargetGroup"]["Properties"]
attrs = {a["Key"]: a["Value"] for a in props["TargetGroupAttributes"]}
assert attrs["proxy_protocol_v2.enabled"] == "true"
assert props["HealthCheckPath"] == "/readyz"
grace = int(env["SLUICE_SHUTDOWN_GRACE"].rstrip("s"))
delay = int(attrs["deregistration_delay.timeout_seconds"])
assert c["StopTimeout"] >= grace + 30 and delay >= grace + 30, "stop timeout and deregistration delay fit the drain"
print(f"  ok  {sys.argv[1]}: {len(keys)} known settings, fleet and PROXY protocol on, /readyz target health, StopTimeout {c['StopTimeout']} s and deregistration delay {delay} s fit shutdown_grace {grace} s + 30 s")
EOF

# The example sluice.toml: TOML, and only keys Sluice knows (the fields of Config).
"$PY" - deploy/systemd/sluice.toml proxy/src/config.rs <<'EOF'
import re, sys
try:
    import tomllib
except ImportError:
    print(f"  --  {sys.argv[1]}: not checked (needs Python 3.11 for tomllib)")
    sys.exit(0)
cfg = tomllib.load(open(sys.argv[1], "rb"))
src = open(sys.argv[2]).read().split("pub struct Config {")[1].split("\n}")[0]
fields = set(re.findall(r"^    pub (\w+):", src, re.M))
unknown = sorted(set(cfg) - fields)
assert not unknown, f"{sys.argv[1]}: keys Sluice does not know: {unknown}"
print(f"  ok  {sys.argv[1]}: TOML, {len(cfg)} known top-level keys")
EOF

# systemd unit with the TLS drop-in (ExecStart's binary replaced: it need not be installed here).
if command -v systemd-analyze >/dev/null 2>&1; then
    tmp=$(mktemp -d)
    sed 's#^ExecStart=/usr/local/bin/sluice #ExecStart=/bin/true #' deploy/systemd/sluice.service \
        >"$tmp/sluice.service"
    mkdir "$tmp/sluice.service.d"
    cp deploy/systemd/sluice-tls.conf "$tmp/sluice.service.d/tls.conf"
    if ! out=$(systemd-analyze verify "$tmp/sluice.service" 2>&1) || [[ -n $out ]]; then
        rm -rf "$tmp"
        printf '%s\n' "$out" >&2
        echo "systemd-analyze verify deploy/systemd/sluice.service failed" >&2
        exit 1
    fi
    rm -rf "$tmp"
    ok "systemd-analyze verify deploy/systemd/sluice.service (with sluice-tls.conf)"

    # The blue/green template for upgrades without a gap, as one of its instances.
    tmp=$(mktemp -d)
    sed 's#^ExecStart=/usr/local/bin/sluice #ExecStart=/bin/true #' 'deploy/systemd/sluice@.service' \
        >"$tmp/sluice@.service"
    if ! out=$(systemd-analyze verify "$tmp/sluice@blue.service" 2>&1) || [[ -n $out ]]; then
        rm -rf "$tmp"
        printf '%s\n' "$out" >&2
        echo "systemd-analyze verify deploy/systemd/sluice@.service failed" >&2
        exit 1
    fi
    rm -rf "$tmp"
    ok "systemd-analyze verify deploy/systemd/sluice@.service (as sluice@blue)"

    # The secret refresh units, and sluice.service with both drop-ins (the hook's path
    # replaced: it need not be installed here).
    tmp=$(mktemp -d)
    sed 's#^ExecStart=/usr/local/bin/sluice #ExecStart=/bin/true #' deploy/systemd/sluice.service \
        >"$tmp/sluice.service"
    mkdir "$tmp/sluice.service.d"
    cp deploy/systemd/sluice-tls.conf "$tmp/sluice.service.d/tls.conf"
    sed 's#/usr/local/sbin/sluice-secret-refresh #/bin/true #' deploy/systemd/sluice-secrets.conf \
        >"$tmp/sluice.service.d/secrets.conf"
    sed 's#^ExecStart=/usr/local/sbin/sluice-secret-refresh #ExecStart=/bin/true #' \
        deploy/systemd/sluice-secret-refresh.service >"$tmp/sluice-secret-refresh.service"
    cp deploy/systemd/sluice-secret-refresh.timer "$tmp/"
    if ! out=$(systemd-analyze verify "$tmp/sluice.service" "$tmp/sluice-secret-refresh.service" \
        "$tmp/sluice-secret-refresh.timer" 2>&1) || [[ -n $out ]]; then
        rm -rf "$tmp"
        printf '%s\n' "$out" >&2
        echo "systemd-analyze verify of the secret refresh units failed" >&2
        exit 1
    fi
    rm -rf "$tmp"
    ok "systemd-analyze verify deploy/systemd/sluice-secret-refresh.{service,timer}, sluice-secrets.conf"
fi

# The secret refresh hook, against stand-ins for the AWS CLI and systemctl in a scratch PATH
# directory (see deploy/systemd/check-secret-refresh.sh).
bash deploy/systemd/check-secret-refresh.sh
ok "deploy/systemd/sluice-secret-refresh: plain and JSON secrets, mode 0600, reload only on change"

# The upgrade script, against stand-ins for systemctl and journalctl.
bash deploy/systemd/check-upgrade.sh
ok "deploy/systemd/sluice-upgrade: the new colour joins before the old one stops; one that never joins is stopped"

# Docker: the health check command is a well-formed exec-form JSON array.
"$PY" - deploy/docker/Dockerfile <<'EOF'
import json, re, sys
text = open(sys.argv[1]).read().replace("\\\n", " ")
m = re.search(r"^HEALTHCHECK .*?CMD (\[.*\])\s*$", text, re.M)
assert m, "HEALTHCHECK ... CMD [...] not found"
cmd = json.loads(m.group(1))
assert cmd[0] == "bash" and "/healthz" in cmd[-1], cmd
assert re.search(r"^ENTRYPOINT \[\"/usr/local/bin/sluice\"\]", text, re.M), "ENTRYPOINT"
assert re.search(r"^USER \d+", text, re.M), "USER (non-root, numeric)"
print(f"  ok  {sys.argv[1]}: HEALTHCHECK, USER, ENTRYPOINT")
EOF

# Shell scripts parse.
for f in deploy/check.sh deploy/local/lib.sh deploy/local/demo.sh benches/compare.sh \
    deploy/systemd/sluice-secret-refresh deploy/systemd/check-secret-refresh.sh \
    deploy/systemd/sluice-upgrade deploy/systemd/check-upgrade.sh; do
    bash -n "$f"
done
ok "bash -n deploy/check.sh deploy/local/*.sh benches/compare.sh deploy/systemd/*secret-refresh* deploy/systemd/sluice-upgrade"
