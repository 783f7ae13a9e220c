#!/usr/bin/env bash
# Checks systemd/skillsync.service and systemd/skillsync.socket:
#   1. `systemd-analyze verify` prints nothing for either (any warning is a
#      failure), and they go together: the socket names the service
#      (Service=), the service Requires= and After= the socket, and both are
#      enabled by their [Install] sections (the documented install enables
#      both, so the listening socket outlives every restart);
#   2. `systemd-analyze security --offline=yes` reports an overall exposure of
#      at most MAX_EXPOSURE (default 2.0);
#   3. systemd/skillsync.sysusers parses (systemd-sysusers --dry-run into
#      a scratch root; nothing on this machine changes).
#
# Run from anywhere after `cargo build`: verify insists that ExecStart names
# an existing executable, so it checks a temporary copy of the unit whose
# ExecStart points at the freshly built binary (target/debug/skillsync, or
# $SKILLSYNC_BIN). The copy differs from the unit in that one line only, so
# line numbers in any message match systemd/skillsync.service.
#
# SKILLSYNC_UNIT_DIR=/usr/lib/systemd/system (with SKILLSYNC_BIN=/usr/bin/skillsync
# and SKILLSYNC_SYSUSERS=/usr/lib/sysusers.d/skillsync.conf) checks the units the
# Debian package installed, in place, with no copy (scripts/check-deb.sh).
#
# Installs Debian's `systemd` package first if systemd-analyze is missing
# (needs root, as on CI). Changes nothing else; safe to run again.
set -euo pipefail

MAX_EXPOSURE="${MAX_EXPOSURE:-2.0}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
UNIT_DIR="${SKILLSYNC_UNIT_DIR:-$ROOT/systemd}"
UNIT="$UNIT_DIR/skillsync.service"
SYSUSERS="${SKILLSYNC_SYSUSERS:-$ROOT/systemd/skillsync.sysusers}"
INSTALLED_BIN=/usr/bin/skillsync
BIN="${SKILLSYNC_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/debug/skillsync}"

fail() {
    echo "check-systemd: FAIL: $*" >&2
    exit 1
}

if ! command -v systemd-analyze >/dev/null 2>&1; then
    if [ "$(id -u)" -ne 0 ]; then
        fail "systemd-analyze is missing; install the 'systemd' package (or run this script as root to have it installed)"
    fi
    echo "check-systemd: systemd-analyze not found; installing the systemd package"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update
    apt-get install -y --no-install-recommends systemd
    command -v systemd-analyze >/dev/null 2>&1 \
        || fail "systemd-analyze is still missing after installing the systemd package"
fi

[ -f "$UNIT" ] || fail "$UNIT not found"
[ -f "$SYSUSERS" ] || fail "$SYSUSERS not found"
[ -x "$BIN" ] || fail "$BIN is not an executable; run 'cargo build' first (or set SKILLSYNC_BIN)"
case "$BIN" in
/*) ;;
*) BIN="$(cd "$(dirname "$BIN")" && pwd)/$(basename "$BIN")" ;;
esac

echo "check-systemd: $(systemd-analyze --version | head -n 1)"

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

# --- 1. verify --------------------------------------------------------------
exec_lines="$(grep -c '^ExecStart=' "$UNIT" || true)"
[ "$exec_lines" = 1 ] || fail "expected exactly one ExecStart= line in $UNIT, found $exec_lines"
grep -q "^ExecStart=$INSTALLED_BIN " "$UNIT" \
    || fail "ExecStart= in $UNIT must start with $INSTALLED_BIN (the documented install path)"

# The copy must keep the unit's name: verify derives the unit name from it.
# The socket sits beside it, so the service's Requires= finds it.
SOCKET="$(dirname "$UNIT")/skillsync.socket"
[ -f "$SOCKET" ] || fail "$SOCKET not found"
# verify also runs `man` for each Documentation=man:… page: installed, the
# package's pages must be found; from the repository they are not installed
# (`skillsync man --dir` writes them), so that one check is left out.
MAN_CHECK=()
if [ "$BIN" = "$INSTALLED_BIN" ]; then
    # The installed units, checked where they are.
    COPY="$UNIT"
    SOCKET_DIR="$UNIT_DIR"
else
    MAN_CHECK=(--man=no)
    cp "$SOCKET" "$TMP/skillsync.socket"
    COPY="$TMP/skillsync.service"
    SOCKET_DIR="$TMP"
    sed "s|^ExecStart=$INSTALLED_BIN |ExecStart=$BIN |" "$UNIT" >"$COPY"
    changed="$(diff "$UNIT" "$COPY" | grep -c '^>' || true)"
    [ "$changed" = 1 ] || fail "could not point the temporary copy's ExecStart at $BIN"
fi

echo "check-systemd: systemd-analyze verify $UNIT (ExecStart=$BIN)"
set +e
verify_out="$(systemd-analyze verify "${MAN_CHECK[@]}" "$COPY" 2>&1)"
verify_rc=$?
set -e
verify_out="${verify_out//$COPY/$UNIT}"
if [ "$verify_rc" -ne 0 ] || [ -n "$verify_out" ]; then
    printf '%s\n' "$verify_out" >&2
    fail "systemd-analyze verify is not clean (exit $verify_rc)"
fi
echo "check-systemd: verify: clean (no output, exit 0)"

# The socket unit (socket activation) is verified beside the service copy.
echo "check-systemd: systemd-analyze verify $SOCKET"
set +e
socket_out="$(cd "$SOCKET_DIR" && systemd-analyze verify "${MAN_CHECK[@]}" "$SOCKET_DIR/skillsync.socket" 2>&1)"
socket_rc=$?
set -e
socket_out="${socket_out//$SOCKET_DIR\//$UNIT_DIR/}"
if [ "$socket_rc" -ne 0 ] || [ -n "$socket_out" ]; then
    printf '%s\n' "$socket_out" >&2
    fail "systemd-analyze verify of skillsync.socket is not clean (exit $socket_rc)"
fi
echo "check-systemd: socket verify: clean"

# The pair: the socket activates this service, the service cannot start
# without the socket (so it always gets the held socket, never binds its own)
# and starts after it, and both are enabled at boot.
grep -qx 'Service=skillsync.service' "$SOCKET" \
    || fail "skillsync.socket must name Service=skillsync.service"
grep -qx 'Requires=skillsync.socket' "$UNIT" \
    || fail "skillsync.service must have Requires=skillsync.socket (the socket outlives restarts)"
grep -qx 'After=skillsync.socket' "$UNIT" \
    || fail "skillsync.service must have After=skillsync.socket"
grep -qx 'WantedBy=sockets.target' "$SOCKET" \
    || fail "skillsync.socket must be enabled by WantedBy=sockets.target"
grep -qE '^Backlog=[0-9]+$' "$SOCKET" \
    || fail "skillsync.socket must set Backlog= (the queue that holds webhooks during a restart)"
echo "check-systemd: socket and service go together (Service=, Requires=, After=, Backlog=)"

# A memory ceiling: a daemon that grows without bound is stopped by systemd,
# not by the host's OOM killer picking some other process.
grep -qE '^MemoryMax=[0-9]+[KMG]$' "$UNIT" \
    || fail "skillsync.service sets no MemoryMax= (a memory ceiling for the service)"
echo "check-systemd: MemoryMax= set ($(grep -E '^MemoryMax=' "$UNIT"))"

# --- 2. security exposure ----------------------------------------------------
echo "check-systemd: systemd-analyze security --offline=yes $UNIT"
set +e
security_out="$(systemd-analyze security --offline=yes --no-pager "$UNIT" 2>&1)"
security_rc=$?
set -e
# Print the items that still carry exposure, then the summary line.
printf '%s\n' "$security_out" | grep -E '^✗' || true
summary="$(printf '%s\n' "$security_out" | grep -E 'Overall exposure level for' || true)"
exposure="$(printf '%s\n' "$summary" | sed -nE 's/.*Overall exposure level for [^:]+: ([0-9]+(\.[0-9]+)?).*/\1/p')"
if [ "$security_rc" -ne 0 ] || [ -z "$exposure" ]; then
    printf '%s\n' "$security_out" >&2
    fail "could not read the overall exposure from systemd-analyze security (exit $security_rc)"
fi
echo "check-systemd: ${summary}"
if ! awk -v e="$exposure" -v max="$MAX_EXPOSURE" 'BEGIN { exit !(e + 0 <= max + 0) }'; then
    fail "overall exposure $exposure is above $MAX_EXPOSURE: harden systemd/skillsync.service (items marked ✗ above)"
fi
echo "check-systemd: exposure $exposure <= $MAX_EXPOSURE"

# --- 3. sysusers -------------------------------------------------------------
mkdir -p "$TMP/root"
set +e
sysusers_out="$(systemd-sysusers --dry-run --root="$TMP/root" - <"$SYSUSERS" 2>&1)"
sysusers_rc=$?
set -e
unit_user="$(sed -n 's/^User=//p' "$UNIT")"
[ -n "$unit_user" ] || fail "$UNIT has no User= line"
if [ "$sysusers_rc" -ne 0 ] || ! printf '%s\n' "$sysusers_out" | grep -q "Creating user '$unit_user'"; then
    printf '%s\n' "$sysusers_out" >&2
    fail "systemd/skillsync.sysusers does not create User=$unit_user of the unit (exit $sysusers_rc)"
fi
echo "check-systemd: sysusers: creates User=$unit_user"

echo "check-systemd: OK"
