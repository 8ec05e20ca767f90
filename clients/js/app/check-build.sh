#!/bin/sh
# Build the web chat and check that the committed build (dist/, which `mqchat serve` serves, so
# that no node is needed to run it) is exactly this build. The build is deterministic: the same
# sources and the same locked packages give the same bytes. A stale dist/ is left rebuilt, and
# the check fails until it is committed.
set -eu
cd "$(dirname "$0")"
committed=$(mktemp -d)
trap 'rm -rf "$committed"' EXIT
if [ -d dist ]; then cp -R dist/. "$committed/"; fi
npm run --silent build
if ! diff -r "$committed" dist >/dev/null 2>&1; then
    diff -rq "$committed" dist | sed "s|$committed|committed|" >&2 || true
    echo "clients/js/app/dist was not the build of its sources; it has been rebuilt: commit it" >&2
    exit 1
fi
echo "clients/js/app/dist is the build of its sources"
