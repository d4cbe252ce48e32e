#!/usr/bin/env bash
# Makes a machine ready to build, test and demo the runner: a Docker daemon that answers, Debian's static busybox
# (the base runner image's shell), git, OpenSSL headers for git's HTTPS/SSH transports, OpenSSH's sshd for the git
# remote tests, PostgreSQL for the fleet tests, and Chromium with chromedriver for the web view's tests.
# Idempotent; safe to run on every invocation. Sourced or executed.
set -euo pipefail

log() { printf 'setup: %s\n' "$*" >&2; }

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

apt_updated=""
apt_install() {
  if [ -z "$apt_updated" ]; then as_root apt-get update -qq >/dev/null; apt_updated=1; fi
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "$@" >/dev/null
}

docker_socket() {
  local host="${DOCKER_HOST:-unix:///var/run/docker.sock}"
  printf '%s' "${host#unix://}"
}

docker_answers() {
  curl -fsS --max-time 5 --unix-socket "$(docker_socket)" http://docker/_ping >/dev/null 2>&1
}

ensure_packages() {
  local missing=()
  command -v curl >/dev/null || missing+=(curl)
  command -v git >/dev/null || missing+=(git)
  # git2's HTTPS and SSH transports build against Debian's OpenSSL (libssh2 comes bundled with libssh2-sys).
  dpkg -s libssl-dev >/dev/null 2>&1 || missing+=(libssl-dev)
  command -v pkg-config >/dev/null || missing+=(pkg-config)
  # The git remote tests serve repositories over SSH with Debian's sshd and ssh-keygen.
  [ -x /usr/sbin/sshd ] || missing+=(openssh-server)
  command -v ssh-keygen >/dev/null || missing+=(openssh-client)
  # The base-image tests stage an image from this machine's own dash and perl.
  [ -x /bin/dash ] || missing+=(dash)
  command -v perl >/dev/null || missing+=(perl-base)
  # The fleet tests start a throwaway PostgreSQL cluster (initdb, pg_ctl) of Debian's packages.
  command -v pg_ctl >/dev/null || ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || missing+=(postgresql)
  # The web view's tests drive a real headless Chromium through chromedriver.
  command -v chromium >/dev/null || missing+=(chromium)
  command -v chromedriver >/dev/null || missing+=(chromium-driver)
  # The base runner image copies this exact file: Debian's statically linked busybox.
  if ! [ -x /bin/busybox ] || ! file_is_static /bin/busybox; then missing+=(busybox-static); fi
  if [ ${#missing[@]} -gt 0 ]; then log "installing ${missing[*]}"; apt_install "${missing[@]}"; fi
}

file_is_static() { ! ldd "$1" >/dev/null 2>&1; }

ensure_docker() {
  if docker_answers; then return 0; fi
  if ! command -v dockerd >/dev/null; then log "installing docker.io"; apt_install docker.io; fi
  if ! docker_answers; then
    log "starting dockerd in the background (log: /tmp/dockerd.log)"
    as_root sh -c 'nohup dockerd >/tmp/dockerd.log 2>&1 &'
    for _ in $(seq 1 60); do docker_answers && break; sleep 1; done
  fi
  if ! docker_answers; then
    log "no Docker daemon answers at $(docker_socket); last lines of /tmp/dockerd.log:"
    tail -n 20 /tmp/dockerd.log >&2 || true
    return 1
  fi
}

# The in-container agent must be a static binary (the base image is FROM scratch). Only the glibc target exists
# here, so static linking is asked of it explicitly; the explicit --target keeps these flags off build scripts.
build_agent() {
  log "building the static in-container agent"
  RUSTFLAGS="-C target-feature=+crt-static" cargo build -q -p runner-agent --release --target x86_64-unknown-linux-gnu
}

main() {
  cd "$(dirname "${BASH_SOURCE[0]}")/.."
  ensure_packages
  ensure_docker
  build_agent
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then main "$@"; fi
