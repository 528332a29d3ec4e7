#!/bin/bash
# Build (or reuse) the cached Debian bookworm rootfs that the system tests boot with
# systemd-nspawn.  Prints the path of the rootfs on stdout (last line).
#
#   scripts/nspawn-rootfs.sh            # build if missing, print the path
#   scripts/nspawn-rootfs.sh --rebuild  # throw the cache away and build again
#
# Environment:
#   GATEWAYD_TEST_CACHE   cache directory   (default /var/cache/gatewayd-test)
#   GATEWAYD_TEST_MIRROR  Debian mirror     (default http://deb.debian.org/debian)
#   GATEWAYD_TEST_SUITE   suite             (default bookworm)
#
# The rootfs is built into a temporary directory beside the cache and renamed at the
# very end, so an interrupted build is never taken for a finished one.  A stamp file
# inside the rootfs records the package list; each list has its own rootfs directory.
set -euo pipefail

cache=${GATEWAYD_TEST_CACHE:-/var/cache/gatewayd-test}
mirror=${GATEWAYD_TEST_MIRROR:-http://deb.debian.org/debian}
suite=${GATEWAYD_TEST_SUITE:-bookworm}
stamp_rel=etc/gatewayd-test-rootfs.stamp

# Everything the gatewayd .deb depends on must be in here: the tests install it offline.
include=(
    systemd systemd-sysv dbus libpam-systemd
    python3 python3-paho-mqtt python3-psutil python3-sdnotify python3-docker python3-pyudev
    python3-prometheus-client
    mosquitto mosquitto-clients cron procps adduser sqlite3 polkitd
)
stamp_content="suite=$suite include=$(IFS=,; echo "${include[*]}") v=2"
# Each package list has a rootfs of its own, so trees with different lists (branches,
# concurrent test runs) never rebuild each other's.
name="rootfs-$suite-$(printf '%s' "$stamp_content" | sha256sum | cut -c1-12)"
root="$cache/$name"

log() { printf 'nspawn-rootfs: %s\n' "$*" >&2; }

if [[ $(id -u) -ne 0 ]]; then
    log "must run as root"
    exit 1
fi

if [[ ${1:-} == --rebuild ]]; then
    log "removing $root"
    rm -rf --one-file-system "$root"
fi

if [[ -d $root && -f $root/$stamp_rel ]] && [[ $(cat "$root/$stamp_rel") == "$stamp_content" ]]; then
    log "reusing $root"
    echo "$root"
    exit 0
fi

for tool in debootstrap systemd-nspawn; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        log "installing $tool"
        DEBIAN_FRONTEND=noninteractive apt-get install -y debootstrap systemd-container >&2
        break
    fi
done

mkdir -p "$cache"
# Leftovers of interrupted builds.
for old in "$cache"/."$name".tmp.*; do
    [[ -e $old ]] || continue
    log "removing stale $old"
    rm -rf --one-file-system "$old"
done

tmp=$(mktemp -d "$cache/.$name.tmp.XXXXXX")
chmod 0755 "$tmp"                                # mktemp makes it 0700: "/" of the container
cleanup() { rm -rf --one-file-system "$tmp"; }
trap cleanup EXIT

log "debootstrap $suite into $tmp (about 1-2 minutes)"
debootstrap --variant=minbase --include="$(IFS=,; echo "${include[*]}")" \
    "$suite" "$tmp" "$mirror" >&2

# Make the container boot quickly and quietly, and never need the network.
echo gatewayd-test >"$tmp/etc/hostname"
: >"$tmp/etc/machine-id"                       # generated at first boot of each copy
rm -f "$tmp/var/lib/dbus/machine-id"
printf '%s\n' 'APT::Install-Recommends "false";' 'APT::Install-Suggests "false";' \
    >"$tmp/etc/apt/apt.conf.d/90gatewayd-test"
for unit in apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer \
            systemd-timesyncd.service systemd-networkd.service systemd-resolved.service \
            getty@tty1.service console-getty.service; do
    ln -sf /dev/null "$tmp/etc/systemd/system/$unit"
done
mkdir -p "$tmp/etc/systemd/journald.conf.d"
printf '[Journal]\nStorage=persistent\nRateLimitIntervalSec=0\nRateLimitBurst=0\n' \
    >"$tmp/etc/systemd/journald.conf.d/90-gatewayd-test.conf"
chroot "$tmp" apt-get clean >&2 || true
echo "$stamp_content" >"$tmp/$stamp_rel"

rm -rf --one-file-system "$root"
mv "$tmp" "$root"
trap - EXIT
log "built $root"
echo "$root"
