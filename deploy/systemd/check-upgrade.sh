#!/usr/bin/env bash
# Offline check of sluice-upgrade (deploy/check.sh runs it): stand-ins for systemctl (unit
# states in files, calls logged) and journalctl (the new instance's log) come first on PATH.
# Checks that the idle colour is started, the running one stopped only after the new one has
# joined its fleet, and that a new instance that never joins is stopped while the running one
# is left serving (non-zero exit).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
script=$PWD/sluice-upgrade

tmp=$(mktemp -d)
[[ -d $tmp ]] || exit 1
trap 'rm -rf "$tmp"' EXIT
mkdir "$tmp/bin" "$tmp/state"
cat >"$tmp/bin/systemctl" <<'END'
#!/usr/bin/env bash
echo "$*" >>"$FAKE/calls"
case $1 in
is-active) [[ -e $FAKE/state/$3 ]] ;;
start) touch "$FAKE/state/$2" ;;
stop) rm -f "$FAKE/state/$2" ;;
esac
END
cat >"$tmp/bin/journalctl" <<'END'
#!/usr/bin/env bash
cat "$FAKE/journal" 2>/dev/null || true
END
cat >"$tmp/bin/sleep" <<'END'
#!/usr/bin/env bash
exit 0
END
chmod +x "$tmp/bin/"*

run() {
    : >"$tmp/calls"
    PATH="$tmp/bin:$PATH" FAKE="$tmp" sh "$script" >"$tmp/out" 2>&1
}

# blue runs; green joins: green started, then blue stopped.
touch "$tmp/state/sluice@blue"
echo "INFO sluice: joined the fleet fleet=orders instance=7" >"$tmp/journal"
run
grep -q "^start sluice@green$" "$tmp/calls"
[[ $(grep -n "^start sluice@green$" "$tmp/calls" | cut -d: -f1) -lt $(grep -n "^stop sluice@blue$" "$tmp/calls" | cut -d: -f1) ]]
[[ -e $tmp/state/sluice@green && ! -e $tmp/state/sluice@blue ]]

# green runs; blue never joins: blue stopped again, green untouched, exit 1.
: >"$tmp/journal"
if run; then
    echo "sluice-upgrade succeeded although the new instance never joined" >&2
    exit 1
fi
grep -q "^stop sluice@blue$" "$tmp/calls"
! grep -q "^stop sluice@green$" "$tmp/calls"
[[ -e $tmp/state/sluice@green ]]
grep -q "sluice@green keeps serving" "$tmp/out"
