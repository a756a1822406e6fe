#!/bin/sh
# Start a store node's Redis with the ACL users from users.acl.
#
# users.acl ships with placeholder passwords (>CHANGE_ME_REPLICATOR,
# >CHANGE_ME_ENGINE). Redis cannot read a password from the environment, so this
# script writes a copy of the file in which each placeholder is replaced by the
# SHA-256 of the real password (the `#<hex>` form), then starts Redis on that
# copy. The plain passwords never touch disk and the hex digest needs no quoting.
#
# Environment:
#   REPLICATOR_PASSWORD  password of the read-only `replicator` user (required)
#   ENGINE_PASSWORD      password of the local `engine` user (required)
#   ACL_TEMPLATE         template path (default /etc/redis/users.acl)
#   ACL_RENDERED         where the rendered file goes (default /tmp/users.acl);
#                        must be on a writable filesystem
# Arguments are passed to redis-server after --aclfile.
#
# Used by deploy/docker-compose.yml; the Kubernetes manifest carries the same
# script in its ConfigMap (tests/unit/test_deploy.py checks they match).
set -eu

: "${REPLICATOR_PASSWORD:?REPLICATOR_PASSWORD must be set}"
: "${ENGINE_PASSWORD:?ENGINE_PASSWORD must be set}"
template="${ACL_TEMPLATE:-/etc/redis/users.acl}"
rendered="${ACL_RENDERED:-/tmp/users.acl}"

sha256_hex() {
    printf '%s' "$1" | sha256sum | cut -d ' ' -f 1
}

replicator_hash="$(sha256_hex "$REPLICATOR_PASSWORD")"
engine_hash="$(sha256_hex "$ENGINE_PASSWORD")"

# The digests are readable only by the owner of the rendered file.
umask 077
sed -e "s/>CHANGE_ME_REPLICATOR\$/#${replicator_hash}/" \
    -e "s/>CHANGE_ME_REPLICATOR /#${replicator_hash} /" \
    -e "s/>CHANGE_ME_ENGINE\$/#${engine_hash}/" \
    -e "s/>CHANGE_ME_ENGINE /#${engine_hash} /" \
    "$template" > "$rendered"

# CLIENT SETINFO, which redis-py 5+ sends on every connect, exists from Redis 7.2 on. Redis 7.0
# and 7.1 check subcommand names and refuse to load an ACL file that names it, so the copy
# leaves it out for them. Redis 6.2 accepts the name, and without the grant it would log an
# ACL denial for every connection.
version="$(redis-server --version 2>/dev/null | sed -n 's/.* v=\([0-9]*\)\.\([0-9]*\)\..*/\1.\2/p')"
major="${version%%.*}"
minor="${version#*.}"
if [ -z "$version" ] || { [ "$major" -eq 7 ] && [ "$minor" -lt 2 ]; }; then
    sed -e 's/ +client|setinfo//g' "$rendered" > "$rendered.tmp"
    mv "$rendered.tmp" "$rendered"
fi

# FCALL_RO (the replicator reads many hashes with the read-only function re_hashes) exists from
# Redis 7.0; 6.2 refuses to load an ACL file that names it, and its peers are read with
# pipelined HGETALLs instead.
if [ -z "$version" ] || [ "$major" -lt 7 ]; then
    sed -e 's/ +fcall_ro//g' "$rendered" > "$rendered.tmp"
    mv "$rendered.tmp" "$rendered"
fi

if grep -q 'CHANGE_ME' "$rendered"; then
    echo "start-redis: a placeholder password is left in $rendered" >&2
    exit 1
fi

# In the official image the entrypoint drops root to the `redis` user before
# starting the server; the rendered file must stay readable after that.
if [ "$(id -u)" = "0" ] && id redis >/dev/null 2>&1; then
    chown redis "$rendered"
fi

exec docker-entrypoint.sh redis-server --aclfile "$rendered" "$@"
