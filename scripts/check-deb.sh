#!/usr/bin/env bash
# Builds the Debian package and checks it on this machine, then purges it.
# Run as root on Debian 12 (as CI does); it installs a package system-wide.
#
#   scripts/check-deb.sh                      # CI: packages target/debug/skillsync
#   DEB_PROFILE=release scripts/check-deb.sh  # builds a release package first
#
# By default it packages the binary `cargo build` made (the one the test
# suite runs; $SKILLSYNC_BIN to choose another), stripped, so CI compiles
# nothing again; DEB_PROFILE builds the package's binary with that profile.
#
# 1. cargo-deb at the pinned version (cargo install --locked, if missing);
# 2. the .deb from scripts/build-deb.sh; `lintian` reports no error
#    (overrides, each with its reason: debian/skillsync.lintian-overrides);
# 3. `dpkg -i`: the binary runs --version; the user, the state directory,
#    the credentials directory; the config is a conffile, root:skillsync 0640,
#    with empty secrets (check-config refuses it, naming the key); the units
#    are installed, not enabled, not started, and pass `systemd-analyze
#    verify` and `security` <= 2.0 (scripts/check-systemd.sh, in place);
#    `man -l` renders every page; completions; the alert rules;
# 4. reinstalling (the upgrade path of the maintainer scripts) keeps an
#    edited config; `dpkg --remove` keeps the config and the database;
# 5. `dpkg --purge` leaves nothing of the package but what
#    docs/operations.md says it leaves: the system user and group.
#
# Whatever happens, the package is purged on exit, so later steps (the test
# suite) run on a machine without it. The service is never started: the
# package does not start it, and without systemd as PID 1 nothing can.
set -euo pipefail

CARGO_DEB_VERSION=3.8.0
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [ -n "${DEB_PROFILE:-}" ]; then
    build_args=(--profile "$DEB_PROFILE")
else
    prebuilt="${SKILLSYNC_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/debug/skillsync}"
    build_args=(--binary "$prebuilt")
fi

say() { echo "check-deb: $*"; }
fail() {
    echo "check-deb: FAIL: $*" >&2
    exit 1
}
[ "$(id -u)" -eq 0 ] || fail "run as root: it installs and purges the package"
command -v dpkg >/dev/null || fail "not a Debian system (no dpkg)"

# --- 1. cargo-deb -------------------------------------------------------------
if [ "$(cargo deb --version 2>/dev/null | awk '{print $NF}')" != "$CARGO_DEB_VERSION" ]; then
    say "cargo install --locked cargo-deb --version $CARGO_DEB_VERSION"
    t0=$(date +%s)
    cargo install --locked cargo-deb --version "$CARGO_DEB_VERSION"
    say "cargo-deb installed in $(($(date +%s) - t0)) s"
fi
for tool in lintian man; do
    command -v "$tool" >/dev/null || fail "$tool is missing: apt-get install lintian man-db"
done

# --- 2. build and lint --------------------------------------------------------
if [ -z "${DEB_PROFILE:-}" ] && [ ! -x "$prebuilt" ]; then
    fail "$prebuilt is not built: run cargo build --locked first, or set DEB_PROFILE=release"
fi
t0=$(date +%s)
deb="$(bash scripts/build-deb.sh "${build_args[@]}" | tail -n 1)"
say "built $deb (${build_args[*]}) in $(($(date +%s) - t0)) s"
dpkg-deb --info "$deb" | sed 's/^/  /'
dpkg-deb --contents "$deb" | awk '{print "  " $1, $2, $NF}'

say "lintian $deb"
t0=$(date +%s)
# --fail-on error: warnings and infos are printed, errors fail.
lintian --fail-on error --info --display-level '>=warning' "$deb" \
    || fail "lintian reports errors (see above)"
say "lintian: no error ($(($(date +%s) - t0)) s)"

# --- 3. install ---------------------------------------------------------------
if dpkg-query --show skillsync >/dev/null 2>&1; then
    say "a skillsync package is installed already; purging it first"
    dpkg --purge skillsync
fi
# Not /var/cache/man: man-db keeps formatted copies of pages read with `man`
# there (systemd-analyze verify reads the units' Documentation= pages), and
# removes them itself once their source is gone (its daily mandb run).
snapshot() {
    find /etc /usr /var/lib /var/cache /var/log -xdev -name '*skillsync*' \
        -not -path '/var/cache/man/*' 2>/dev/null | sort
}
before="$(mktemp)"
snapshot >"$before"
cleanup() {
    if dpkg-query --show skillsync >/dev/null 2>&1; then
        echo "check-deb: purging the package (cleanup)" >&2
        dpkg --purge skillsync >/dev/null 2>&1 || true
    fi
    rm -f "$before"
}
trap cleanup EXIT

say "dpkg -i"
dpkg -i "$deb"

version="$(skillsync --version)"
expected="skillsync $(dpkg-deb --field "$deb" Version | sed 's/-[^-]*$//')"
[ "$version" = "$expected" ] || fail "skillsync --version says '$version', expected '$expected'"
[ "$(command -v skillsync)" = /usr/bin/skillsync ] || fail "skillsync is not /usr/bin/skillsync"
say "binary: $version"

getent passwd skillsync >/dev/null || fail "no user skillsync"
getent group skillsync >/dev/null || fail "no group skillsync"
[ "$(stat -c '%U:%G %a' /var/lib/skillsync)" = "skillsync:skillsync 750" ] \
    || fail "/var/lib/skillsync is $(stat -c '%U:%G %a' /var/lib/skillsync), expected skillsync:skillsync 750"
[ "$(stat -c '%U:%G %a' /etc/skillsync/credentials)" = "root:root 700" ] \
    || fail "/etc/skillsync/credentials is not root:root 700"
say "user, group, state and credentials directories: ok"

CONF=/etc/skillsync/skillsync.toml
conffiles="$(dpkg-query --showformat='${Conffiles}\n' --show skillsync)"
printf '%s\n' "$conffiles" | grep -q "^ $CONF " || fail "$CONF is not a conffile: $conffiles"
[ "$(stat -c '%U:%G %a' "$CONF")" = "root:skillsync 640" ] \
    || fail "$CONF is $(stat -c '%U:%G %a' "$CONF"), expected root:skillsync 640"
grep -q '^webhook_secrets = \[\]' "$CONF" \
    || fail "$CONF does not ship empty webhook secrets"
if grep -q 'replace-with-the-webhook-secret\|replace-with-X-AppSecret' "$CONF"; then
    fail "$CONF ships a placeholder secret"
fi
set +e
cc_out="$(skillsync check-config 2>&1)"
cc_rc=$?
set -e
[ "$cc_rc" = 2 ] && printf '%s' "$cc_out" | grep -q 'tenant\[0\].webhook_secrets' \
    || fail "check-config of the shipped config should exit 2 naming the secret (exit $cc_rc: $cc_out)"
say "config: a conffile, root:skillsync 640, secrets empty (check-config: $cc_out)"

# Installed, not enabled, not started.
if compgen -G '/etc/systemd/system/*.wants/skillsync.*' >/dev/null; then
    fail "the install enabled a unit: $(ls /etc/systemd/system/*.wants/skillsync.*)"
fi
if [ -d /run/systemd/system ]; then
    ! systemctl is-active --quiet skillsync.service || fail "the install started skillsync.service"
    ! systemctl is-active --quiet skillsync.socket || fail "the install started skillsync.socket"
else
    say "systemd is not PID 1 here: the maintainer scripts ran without it"
fi
SKILLSYNC_UNIT_DIR=/usr/lib/systemd/system SKILLSYNC_BIN=/usr/bin/skillsync \
    SKILLSYNC_SYSUSERS=/usr/lib/sysusers.d/skillsync.conf bash scripts/check-systemd.sh
[ -f /usr/lib/tmpfiles.d/skillsync.conf ] || fail "no tmpfiles.d snippet"

pages=0
for page in /usr/share/man/man1/skillsync*.1.gz /usr/share/man/man5/skillsync.toml.5.gz; do
    [ -f "$page" ] || fail "$page missing"
    rendered="$(MANWIDTH=80 man -l "$page" 2>&1 >/dev/null)" || fail "man -l $page failed: $rendered"
    [ -z "$rendered" ] || fail "man -l $page warns: $rendered"
    man -l "$page" 2>/dev/null | grep -q NAME || fail "man -l $page renders no NAME section"
    pages=$((pages + 1))
done
subcommands="$(skillsync --help | sed -n '/^Commands:/,/^$/p' | awk 'NR>1 && $1 != "help" && NF {print $1}' | wc -l)"
[ "$pages" -eq $((subcommands + 2)) ] \
    || fail "$pages man pages for $subcommands subcommands (expected one each, skillsync(1) and skillsync.toml(5))"
MANWIDTH=80 man -l /usr/share/man/man5/skillsync.toml.5.gz | grep -q 'tenant.webhook_secrets' \
    || fail "skillsync.toml(5) does not list tenant.webhook_secrets"
say "man -l renders all $pages pages"

bash -n /usr/share/bash-completion/completions/skillsync || fail "bash completion does not parse"
[ -s /usr/share/zsh/vendor-completions/_skillsync ] || fail "no zsh completion"
[ -s /usr/share/fish/vendor_completions.d/skillsync.fish ] || fail "no fish completion"
for f in /usr/share/skillsync/alerts.yml /usr/share/skillsync/grafana-dashboard.json \
    /usr/share/doc/skillsync/README.md.gz /usr/share/doc/skillsync/operations.md.gz \
    /usr/share/doc/skillsync/copyright /usr/share/doc/skillsync/changelog.Debian.gz; do
    [ -f "$f" ] || fail "$f missing"
done
if command -v promtool >/dev/null; then
    promtool check rules /usr/share/skillsync/alerts.yml >/dev/null || fail "promtool check rules"
fi
say "completions, docs, dashboard and alert rules installed"

# --- 4. upgrade path, remove --------------------------------------------------
echo '# a local edit' >>"$CONF"
say "dpkg -i again (the maintainer scripts' upgrade path)"
dpkg -i "$deb"
grep -q '^# a local edit$' "$CONF" || fail "reinstalling lost the local edit of $CONF"
[ "$(stat -c '%U:%G %a' "$CONF")" = "root:skillsync 640" ] || fail "reinstalling changed $CONF's owner or mode"

touch /var/lib/skillsync/skillsync.db
chown skillsync:skillsync /var/lib/skillsync/skillsync.db
say "dpkg --remove"
dpkg --remove skillsync
[ ! -e /usr/bin/skillsync ] || fail "remove left the binary"
[ -f /var/lib/skillsync/skillsync.db ] || fail "remove deleted the database"
[ -f "$CONF" ] || fail "remove deleted the config (a conffile stays until purge)"
say "remove: binary gone, config and database kept"

# --- 5. purge -----------------------------------------------------------------
say "dpkg --purge"
dpkg --purge skillsync
after="$(snapshot)"
left="$(comm -13 "$before" <(printf '%s\n' "$after" | sed '/^$/d'))"
[ -z "$left" ] || fail "purge left: $left"
getent passwd skillsync >/dev/null || fail "purge removed the user (the docs say it is kept)"
say "purge: nothing left but the user and group skillsync (as documented)"
say "OK"
