#!/bin/sh
# Build the web chat and check that the committed build (dist/, which `mqchat serve` serves, so
# that no node is needed to run it) is exactly this build. The build is deterministic: the same
# sources and the same locked packages give the same bytes. The fresh build is compared with
# what git has committed (changed, deleted and new files alike), so a stale dist/ is left
# rebuilt and the check keeps failing until the build is committed. Outside a git checkout (a
# source archive) it compares with the dist/ that was there before the build.
set -eu
cd "$(dirname "$0")"
stale() {
    echo "clients/js/app/dist is not the build of its sources; it has been rebuilt: commit it" >&2
    exit 1
}
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    npm run --silent build
    changes=$(git status --porcelain --untracked-files=all --ignored=matching -- dist)
    if [ -n "$changes" ]; then
        echo "$changes" >&2
        stale
    fi
else
    before=$(mktemp -d)
    trap 'rm -rf "$before"' EXIT
    if [ -d dist ]; then cp -R dist/. "$before/"; fi
    npm run --silent build
    if ! diff -r "$before" dist >/dev/null 2>&1; then
        diff -rq "$before" dist | sed "s|$before|before|" >&2 || true
        stale
    fi
fi
echo "clients/js/app/dist is the build of its sources"
