#!/usr/bin/env bash
# The services the real-server tests need, installed idempotently: PostgreSQL's
# binaries (Debian's postgresql package), for tests/system/test_servers_postgres.py.
#
# It installs only and starts nothing: the tests' fixture (tests/servers.py)
# initdb's its own throwaway cluster in a temporary folder, runs it on a free
# port of 127.0.0.1 (as the `postgres` user when run as root) and stops it
# afterwards. So that the package starts no cluster of its own either, the
# install is told not to create Debian's default `main` cluster.
#
# Not root and PostgreSQL missing: a message, exit 0; those tests then skip
# (and fail under CI=true). Re-running it once installed takes no time.
set -euo pipefail

have_postgres() {  # the same places tests/servers.py looks: PATH, then /usr/lib/postgresql/*/bin
  local found dir
  if found=$(command -v pg_ctl 2>/dev/null); then
    dir=$(dirname "$(readlink -f "$found")")
    [ -x "$dir/initdb" ] && { echo "$dir"; return 0; }
  fi
  for dir in /usr/lib/postgresql/*/bin; do
    [ -x "$dir/pg_ctl" ] && [ -x "$dir/initdb" ] && { echo "$dir"; return 0; }
  done
  return 1
}

if dir=$(have_postgres); then
  echo "ci-services: PostgreSQL found ($dir)"
  exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
  echo "ci-services: PostgreSQL is not installed and this is not root, so the PostgreSQL-backed tests" \
       "will be skipped. To run them: sudo bash scripts/ci-services.sh (or: sudo apt-get install postgresql)." >&2
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "ci-services: PostgreSQL is not installed and there is no apt-get here: install PostgreSQL's server" \
       "binaries (initdb, pg_ctl) by hand, or set MMRAD_PG_BINDIR to their folder." >&2
  exit 0
fi

echo "ci-services: installing PostgreSQL (Debian's postgresql package)"
# No default cluster: nothing gets started (postgresql-common reads createcluster.d).
mkdir -p /etc/postgresql-common/createcluster.d
echo "create_main_cluster = false  # mmrad: the tests run their own throwaway cluster" \
  > /etc/postgresql-common/createcluster.d/mmrad-ci.conf
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >/dev/null

# An older postgresql-common may still have created and started one: stop it, the tests do not use it.
if command -v pg_lsclusters >/dev/null 2>&1; then
  pg_lsclusters --no-header 2>/dev/null | while read -r version cluster _port status _rest; do
    if [ "$status" = online ]; then
      echo "ci-services: stopping the package's cluster $version/$cluster"
      pg_ctlcluster "$version" "$cluster" stop || true
    fi
  done
fi

if dir=$(have_postgres); then
  echo "ci-services: PostgreSQL installed ($dir)"
else
  echo "ci-services: the postgresql package installed, but initdb/pg_ctl are still not found" >&2
  exit 1
fi
