#!/bin/sh
# Debian packages the test suite talks to for real: Mosquitto (interop, reference client tools)
# and Redis (the shared presence registry), HAProxy (the load balancer in front of a cluster of
# nodes), curl (the README tour), Node.js with npm (MQTT.js, the WebSocket client the interop
# tests drive: `make js-deps`; 20.19 or later for the web chat's build: `make app`), Chromium (headless, driven by
# Playwright in the web chat's browser tests; Debian's build, so Playwright downloads no
# browser) with a font for its screenshots, and a Java 17 runtime with
# Maven for the Cassandra test node (storage/cassandra/devnode.py runs Cassandra 5.0 from Maven
# Central's jars; 5.0 needs Java 17: not 21+, whatever `java` is the default). Only what is
# missing is installed; their system services are left stopped (see apt_install).
set -eu
. "$(dirname "$0")/lib.sh"

# A Java 17 where devnode.py looks for one: $JAVA_HOME, the java on PATH, /usr/lib/jvm/*.
has_java17() {
    for java in ${JAVA_HOME:+"$JAVA_HOME/bin/java"} "$(command -v java 2>/dev/null || true)" /usr/lib/jvm/*/bin/java; do
        [ -n "$java" ] && [ -x "$java" ] && "$java" -version 2>&1 | grep -q 'version "17[."]' && return 0
    done
    return 1
}

missing=""
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing="$missing mosquitto"
command -v mosquitto_pub >/dev/null 2>&1 || missing="$missing mosquitto-clients"
command -v redis-server >/dev/null 2>&1 || [ -x /usr/bin/redis-server ] || missing="$missing redis-server"
command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || missing="$missing haproxy"
command -v curl >/dev/null 2>&1 || missing="$missing curl ca-certificates"
command -v node >/dev/null 2>&1 || missing="$missing nodejs"
command -v npm >/dev/null 2>&1 || missing="$missing npm"
command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ] || missing="$missing chromium"
[ -d /usr/share/fonts/truetype/dejavu ] || missing="$missing fonts-dejavu-core"
# Debian 12 and Ubuntu 22.04/24.04 carry openjdk-17-jre-headless; Debian 13 does not (install a
# JDK 17 from elsewhere and point JAVA_HOME at it).
has_java17 || missing="$missing openjdk-17-jre-headless"
command -v mvn >/dev/null 2>&1 || missing="$missing maven"
if [ -n "$missing" ]; then
    # shellcheck disable=SC2086  # a list of package names
    apt_install $missing
fi
# The web chat's build (Vite) needs Node.js 20.19 or later; Debian 12's own nodejs is 18.
node_ok=$(node -e 'const [a, b] = process.versions.node.split(".").map(Number); console.log(a > 20 || (a === 20 && b >= 19) ? "yes" : "no")')
if [ "$node_ok" != yes ]; then
    echo "system-deps: Node.js $(node --version) is too old for the web chat's build: install Node.js 20.19 or later" >&2
    exit 1
fi
