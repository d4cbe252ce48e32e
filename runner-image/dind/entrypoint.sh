#!/bin/sh
# Starts the step's own Docker daemon. The container is not `privileged` (see the runner's dind_body), so its
# cgroup hierarchies arrive read-only: mount our own, writable, in the container's private cgroup namespace.
set -eu

if [ -f /sys/fs/cgroup/cgroup.controllers ]; then
    # cgroup v2: leave the root of our namespace to child groups so its controllers can be delegated to them.
    mount -o remount,rw /sys/fs/cgroup
    mkdir -p /sys/fs/cgroup/init
    xargs -rn1 < /sys/fs/cgroup/cgroup.procs > /sys/fs/cgroup/init/cgroup.procs 2>/dev/null || :
    sed -e 's/ / +/g' -e 's/^/+/' < /sys/fs/cgroup/cgroup.controllers > /sys/fs/cgroup/cgroup.subtree_control
else
    # cgroup v1: one hierarchy a directory ("cpu,cpuacct" and the like; the single names are symlinks to them).
    mount -o remount,rw /sys/fs/cgroup
    for dir in /sys/fs/cgroup/*; do
        name=${dir##*/}
        [ -L "$dir" ] && continue
        case "$name" in
            unified) continue ;;
            systemd) options=none,name=systemd ;;
            *) options=$name ;;
        esac
        umount "$dir" 2>/dev/null || :
        mount -t cgroup -o "$options" cgroup "$dir"
    done
fi

# Warnings and errors only: the info lines would bury what matters in the step's log.
exec dockerd --host=unix:///run/dind/docker.sock --log-level=warn "$@"
