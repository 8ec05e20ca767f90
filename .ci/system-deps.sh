#!/bin/sh
# Debian packages the test suite talks to for real: Mosquitto (interop, reference client tools)
# and Redis (the shared presence registry), and curl (the README tour). Only what is missing is
# installed; their system services are left stopped (see apt_install).
set -eu
. "$(dirname "$0")/lib.sh"
missing=""
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing="$missing mosquitto"
command -v mosquitto_pub >/dev/null 2>&1 || missing="$missing mosquitto-clients"
command -v redis-server >/dev/null 2>&1 || [ -x /usr/bin/redis-server ] || missing="$missing redis-server"
command -v curl >/dev/null 2>&1 || missing="$missing curl ca-certificates"
[ -z "$missing" ] && exit 0
# shellcheck disable=SC2086  # a list of package names
apt_install $missing
