#!/bin/sh
# Before `python -m venv`: Python 3.11+ with the venv module. On Debian the venv module (with
# ensurepip) is a separate package, installed here when missing.
set -eu
. "$(dirname "$0")/lib.sh"
python="${1:-python3}"
if ! command -v "$python" >/dev/null 2>&1; then
    echo "mqchat: $python not found; install Python 3.11 or newer (Debian: apt-get install python3)" >&2
    exit 1
fi
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "mqchat: $python is Python $("$python" -c 'import platform; print(platform.python_version())'); 3.11 or newer is needed (make PYTHON=python3.11 ...)" >&2
    exit 1
fi
"$python" -c 'import ensurepip, venv' 2>/dev/null && exit 0
version=$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
if command -v apt-get >/dev/null 2>&1; then
    apt_install "python$version-venv"
else
    echo "mqchat: $python has no venv module; install it with your system's package manager" >&2
    exit 1
fi
