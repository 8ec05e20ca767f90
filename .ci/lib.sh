# Shared by the set-up scripts: run as root (sudo only when needed and present) and install
# Debian packages without starting their services.

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        echo "mqchat: need root to run: $* (run it as root, or install sudo)" >&2
        return 1
    fi
}

# apt_install PACKAGE...: install from Debian. A package's system service (mosquitto on 1883,
# redis-server on 6379, haproxy) is neither started nor enabled: the tests run their own servers on free
# ports, and `make serve` needs port 1883 for itself.
apt_install() {
    echo "installing Debian packages: $*"
    policy=/usr/sbin/policy-rc.d
    made_policy=""
    if [ ! -e "$policy" ]; then
        # Debian's way to tell maintainer scripts not to start services (exit 101: "not allowed").
        printf '#!/bin/sh\nexit 101\n' | as_root tee "$policy" >/dev/null && as_root chmod 755 "$policy" && made_policy=1
    fi
    status=0
    as_root apt-get update -qq && as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "$@" >/dev/null || status=$?
    [ -n "$made_policy" ] && as_root rm -f "$policy"
    [ "$status" -eq 0 ] || return "$status"
    if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
        for pkg in "$@"; do
            case "$pkg" in
                mosquitto | redis-server | haproxy) as_root systemctl disable --now "$pkg.service" >/dev/null 2>&1 || true ;;
            esac
        done
    fi
}
