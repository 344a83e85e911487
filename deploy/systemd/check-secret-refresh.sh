#!/usr/bin/env bash
# Offline check of sluice-secret-refresh (deploy/check.sh runs it): stand-ins for the AWS CLI
# (secrets from files) and systemctl (calls logged) come first on PATH, in a scratch directory.
# Checks that plain and JSON secrets are written with mode 0600, unchanged files are left
# alone, Sluice is reloaded only after a change and never with --no-reload, and failures are
# reported (non-zero exit, the file kept, no secret in the output).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
hook=$PWD/sluice-secret-refresh

tmp=$(mktemp -d)
[[ -d $tmp ]] || exit 1
trap 'rm -rf "$tmp"' EXIT
mkdir "$tmp/bin" "$tmp/aws"
cat >"$tmp/bin/aws" <<'END'
#!/usr/bin/env bash
# aws secretsmanager get-secret-value --secret-id ID --query SecretString --output text
[[ "$1 $2" == "secretsmanager get-secret-value" ]] || exit 2
while [[ $# -gt 0 && $1 != --secret-id ]]; do shift; done
cat "$FAKE_AWS/$2"
END
cat >"$tmp/bin/systemctl" <<'END'
#!/usr/bin/env bash
echo "$*" >>"$FAKE_SYSTEMCTL_LOG"
END
chmod +x "$tmp/bin/aws" "$tmp/bin/systemctl"

json_password='p"$`\w 1'
printf '%s\n' 'pw-1' >"$tmp/aws/plain"
printf '%s\n' '{"username": "app", "password": "p\"$`\\w 1"}' >"$tmp/aws/json"
cat >"$tmp/list" <<END
# a comment, then a blank line

$tmp/out/plain  plain
$tmp/out/json   json  password
END

refresh() {
    : >"$tmp/systemctl.log"
    PATH="$tmp/bin:$PATH" FAKE_AWS="$tmp/aws" FAKE_SYSTEMCTL_LOG="$tmp/systemctl.log" \
        SLUICE_SECRET_OWNER="$(id -un)" bash "$hook" "$@" 2>"$tmp/stderr"
}
fail() {
    echo "sluice-secret-refresh: $*" >&2
    cat "$tmp/stderr" >&2
    exit 1
}

refresh "$tmp/list" || fail "the first run failed"
[[ $(cat "$tmp/out/plain") == pw-1 ]] || fail "wrong content of a plain secret"
[[ $(cat "$tmp/out/json") == "$json_password" ]] || fail "wrong content of a JSON secret"
for f in plain json; do
    [[ $(stat -c %a "$tmp/out/$f") == 600 ]] || fail "$f: mode is not 0600"
done
grep -qx 'reload sluice.service' "$tmp/systemctl.log" || fail "no reload after a change"

refresh "$tmp/list" || fail "the second run failed"
[[ ! -s $tmp/systemctl.log ]] || fail "reloaded though nothing changed"

printf '%s\n' 'pw-2' >"$tmp/aws/plain"
refresh --no-reload "$tmp/list" || fail "the --no-reload run failed"
[[ $(cat "$tmp/out/plain") == pw-2 ]] || fail "--no-reload did not write the file"
[[ ! -s $tmp/systemctl.log ]] || fail "--no-reload reloaded"

printf '%s\n' '{"user": "app"}' >"$tmp/aws/json"
if refresh "$tmp/list"; then fail "a JSON secret without the field was accepted"; fi
[[ $(cat "$tmp/out/json") == "$json_password" ]] || fail "a failed refresh changed the file"
if grep -q -e 'pw-' -e '"user"' "$tmp/stderr"; then fail "a secret in the output"; fi

rm "$tmp/aws/json"
if refresh "$tmp/list"; then fail "a missing secret was not reported"; fi
[[ -z $(find "$tmp/out" -name '.*') ]] || fail "temporary files left behind"
