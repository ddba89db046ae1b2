# shellcheck shell=bash
# The one installer of Debian packages for every script (test, bench,
# build-board, board-run, install-image, bench-sizes): installs what is
# missing, once, and keeps the installed servers from starting as system
# services, since the tests and benchmarks start their own on ephemeral ports.

# apt_install PACKAGE...: installs the Debian packages that are missing.
apt_install() {
    local missing=() package
    for package in "$@"; do
        dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
    done
    ((${#missing[@]})) || return 0
    if ! command -v apt-get >/dev/null; then
        echo "${0##*/}: needs the Debian packages ${missing[*]}; install them with your package manager" >&2
        exit 1
    fi
    echo "== installing ${missing[*]}" >&2
    # Debian's maintainer scripts ask policy-rc.d before starting a service;
    # 101 means "not allowed". Left in place only if we made it.
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
}
