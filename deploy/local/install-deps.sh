#!/usr/bin/env bash
# Installs what building and running Quartermaster locally needs (Debian 12):
# the Debian packages below, only those missing, then the SCIM peer's npm packages.
# A second run with nothing missing does no network access and takes a second.
set -euo pipefail
# shellcheck source=common.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/common.sh"

PACKAGES=(
    build-essential cmake pkg-config git curl ca-certificates openssl
    librdkafka-dev libprotobuf-c-dev protobuf-c-compiler libpq-dev libhiredis-dev
    libcurl4-openssl-dev libcriterion-dev libmicrohttpd-dev libjansson-dev libjwt-dev
    libyaml-dev libldap2-dev libssl-dev uuid-dev libcsv-dev
    slapd ldap-utils postgresql postgresql-client redis-server
)
# These four may come from outside apt (SDKMAN, NodeSource, a tarball...):
# a working command is enough.
declare -A BY_COMMAND=([java]=default-jre-headless [mvn]=maven [node]=nodejs [npm]=npm)

missing=()
installed="$(dpkg-query -W -f='${Package} ${Status}\n' "${PACKAGES[@]}" 2>/dev/null |
    awk '$NF == "installed" {print $1}' || true)"
for p in "${PACKAGES[@]}"; do
    grep -qxF "$p" <<<"$installed" || missing+=("$p")
done
for c in java mvn node npm; do
    command -v "$c" >/dev/null || missing+=("${BY_COMMAND[$c]}")
done

if ((${#missing[@]} == 0)); then
    qm_log "apt: all ${#PACKAGES[@]} packages present; java, mvn, node, npm found"
else
    qm_log "apt: missing ${missing[*]}"
    if ! qm_is_root; then
        qm_log "not root: run this as root, then run this script again:"
        qm_log "  apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ${missing[*]}"
        exit 1
    fi
    qm_log "apt-get update"
    apt-get update -q >/dev/null
    qm_log "apt-get install ${missing[*]}"
    apt-get install -y -q --no-install-recommends -o Dpkg::Options::=--force-confdef \
        -o Dpkg::Options::=--force-confold "${missing[@]}" >/dev/null
    qm_log "apt: installed ${#missing[@]} package(s)"
fi

java_line="$(java -version 2>&1 | head -n1)"
qm_log "java: $java_line ($(command -v java))"
qm_log "node: $(node --version), npm $(npm --version 2>/dev/null)"

qm_scim_npm
qm_log "dependencies ready"
