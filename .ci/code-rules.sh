#!/usr/bin/env bash
# House rules of the proxy's source that a compiler does not check. Usage: code-rules.sh [SRC]
#   - nothing outside the crate root and net/ names the session module;
#   - ErrorResponse fields are built only by the error module and protocol/;
#   - no SQLSTATE literal (a 5-character code in quotes) or severity string outside the error
#     module and protocol/ (use protocol::sqlstate and error::Severity);
#   - no source file over 800 lines (tests in files of their own don't count against it).
set -euo pipefail
src="${1:-proxy/src}"
fail=0

complain() {
    echo "code rules: $1" >&2
    shift
    printf '  %s\n' "$@" >&2
    fail=1
}

hits=$(grep -rn --include='*.rs' -E 'crate::session|super::session' "$src" \
    | grep -v -E "^$src/(lib\.rs|main\.rs|net/)" || true)
[[ -z "$hits" ]] || complain "only the crate root and net/ may use the session module:" "$hits"

hits=$(grep -rn --include='*.rs' 'ErrorFields {' "$src" \
    | grep -v -E "^$src/(error\.rs|protocol/)" || true)
[[ -z "$hits" ]] || complain "ErrorFields built outside error.rs and protocol/:" "$hits"

# A SQLSTATE is five digits or capitals, at least one a digit (console words like "POOLS" are not).
hits=$(grep -rnP --include='*.rs' '"(?=[0-9A-Z]*[0-9])[0-9A-Z]{5}"|"(FATAL|ERROR|PANIC)"' "$src" \
    | grep -v -E "^$src/(error\.rs|protocol/)" \
    | grep -v -E '^\S+:\s*//' || true)
[[ -z "$hits" ]] || complain "SQLSTATE or severity literal outside error.rs and protocol/:" "$hits"

while IFS= read -r f; do
    n=$(wc -l <"$f")
    case "$f" in */tests.rs | */tests/*) continue ;; esac
    if ((n > 800)); then
        complain "source file over 800 lines:" "$f ($n lines)"
    fi
done < <(find "$src" -name '*.rs')

if ((fail)); then
    exit 1
fi
echo "code rules: ok"
