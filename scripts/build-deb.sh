#!/usr/bin/env bash
# Builds the Debian package: target/debian/skillsync_<version>-1_<arch>.deb.
#
#   scripts/build-deb.sh                     # a release package (profile release)
#   scripts/build-deb.sh --binary target/debug/skillsync
#       # CI: package the binary already built and tested (dev profile), stripped,
#       # under the packaging profile ci-deb, instead of compiling again
#
# Steps: `cargo build --locked` of the binary (or a copy of --binary); the files the binary generates
# for the package (its man pages, bash/zsh/fish completions, and the config
# with empty secrets that becomes /etc/skillsync/skillsync.toml) into
# <target>/<profile>/deb-assets/; then `cargo deb --no-build`, which reads
# [package.metadata.deb] in Cargo.toml. Needs cargo-deb:
#   cargo install --locked cargo-deb --version 3.8.0
# Prints the path of the .deb on its last line.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

profile=release
prebuilt=
while [ $# -gt 0 ]; do
    case "$1" in
    --profile) profile="$2"; shift 2 ;;
    --binary) prebuilt="$2"; profile=ci-deb; shift 2 ;;
    *) echo "build-deb: unknown argument $1" >&2; exit 2 ;;
    esac
done

command -v cargo-deb >/dev/null 2>&1 || {
    echo "build-deb: cargo-deb is missing: cargo install --locked cargo-deb --version 3.8.0" >&2
    exit 1
}

target_dir="$(cargo metadata --format-version 1 --no-deps --locked \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')"
out="$target_dir/$profile"
assets="$out/deb-assets"

bin="$out/skillsync"
if [ -n "$prebuilt" ]; then
    [ -x "$prebuilt" ] || { echo "build-deb: $prebuilt is not an executable" >&2; exit 1; }
    echo "build-deb: packaging the prebuilt $prebuilt (as profile $profile)"
    mkdir -p "$out"
    cp "$prebuilt" "$bin"
else
    echo "build-deb: cargo build --locked --profile $profile"
    cargo build --locked --profile "$profile" --bin skillsync
fi

rm -rf "$assets"
mkdir -p "$assets/man" "$assets/completions"
"$bin" man --dir "$assets/man" >/dev/null
"$bin" completions bash >"$assets/completions/skillsync"
"$bin" completions zsh >"$assets/completions/_skillsync"
"$bin" completions fish >"$assets/completions/skillsync.fish"
"$bin" print-config --empty-secrets >"$assets/skillsync.toml"
# Debian policy: man pages, and docs over 4 kB, gzip -9n (no name, no time).
gzip -9n "$assets"/man/*
mkdir -p "$assets/doc"
for doc in README.md docs/operations.md; do
    gzip -9n <"$doc" >"$assets/doc/$(basename "$doc").gz"
done
echo "build-deb: generated $(ls "$assets/man" | wc -l) man pages, 3 completions, the config"

# SOURCE_DATE_EPOCH makes the archive's timestamps those of the last commit.
if [ -z "${SOURCE_DATE_EPOCH:-}" ] && git -C "$ROOT" rev-parse HEAD >/dev/null 2>&1; then
    SOURCE_DATE_EPOCH="$(git -C "$ROOT" log -1 --format=%ct)"
    export SOURCE_DATE_EPOCH
fi
deb_args=(--no-build --locked --profile "$profile")
# Release keeps debug info ([profile.release] debug = 1): stripped from the
# binary into a second package, skillsync-dbgsym_<version>_<arch>.ddeb, beside
# the .deb. Other profiles have none; cargo-deb strips the binary.
[ "$profile" != release ] || deb_args+=(--dbgsym)
deb="$(cargo deb "${deb_args[@]}" | tail -n 1)"
[ -f "$deb" ] || { echo "build-deb: cargo deb did not print a .deb path (got: $deb)" >&2; exit 1; }
echo "$deb"
