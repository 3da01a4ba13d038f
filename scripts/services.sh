#!/usr/bin/env bash
# Starts the local services the tests need when they are not already up
# (and installs headless Chromium for the map test):
# Redis on 127.0.0.1:6379 and PostgreSQL on 127.0.0.1:5432 (database `test`).
# The commands are those of the python-svc machine; on a fresh Debian/Ubuntu
# machine the packages are installed first.
set -uo pipefail

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_port() { for _ in $(seq 1 50); do port_open "$1" && return 0; sleep 0.2; done; return 1; }
apt_install() {
  command -v apt-get >/dev/null || { echo "services: apt-get not found, install $* by hand" >&2; return 1; }
  [ -n "${_APT_UPDATED:-}" ] || { apt-get update -qq >/dev/null; _APT_UPDATED=1; }
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

if ! port_open 6379; then
  command -v redis-server >/dev/null || apt_install redis-server
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
  wait_port 6379 && echo "services: started redis" || echo "services: redis did not start" >&2
fi

if ! port_open 5432; then
  ls /etc/postgresql >/dev/null 2>&1 || apt_install postgresql
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start
  wait_port 5432 && echo "services: started postgresql" || echo "services: postgresql did not start" >&2
fi
if port_open 5432 && command -v psql >/dev/null; then
  # The tests use a role and a database of their own (realtime_test, password
  # realtime_test), made here once through the local socket as the postgres
  # superuser. Nothing else is changed: not the postgres role, not its password.
  pg() { su postgres -c "psql -v ON_ERROR_STOP=1 -qtA -d postgres -c \"$1\"" 2>/dev/null; }
  login() { PGPASSWORD=realtime_test psql -h 127.0.0.1 -U realtime_test -w -d realtime_test -tAc "SELECT 1" >/dev/null 2>&1; }
  if ! login; then
    { pg "SELECT 1 FROM pg_roles WHERE rolname='realtime_test'" | grep -q 1 \
        && pg "ALTER ROLE realtime_test LOGIN PASSWORD 'realtime_test'" \
        || pg "CREATE ROLE realtime_test LOGIN PASSWORD 'realtime_test'"; }
    pg "SELECT 1 FROM pg_database WHERE datname='realtime_test'" | grep -q 1 \
      || pg "CREATE DATABASE realtime_test OWNER realtime_test"
    if login; then
      echo "services: made the realtime_test role and database"
    else
      echo "services: cannot log in as realtime_test on 127.0.0.1; as a PostgreSQL superuser run:" \
           "CREATE ROLE realtime_test LOGIN PASSWORD 'realtime_test'; CREATE DATABASE realtime_test OWNER realtime_test;" \
           "and allow password logins from 127.0.0.1 in pg_hba.conf" >&2
    fi
  fi
fi
# Headless Chromium for the map page test (Debian's package; nothing is downloaded by the test).
if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null; then
  apt_install chromium && echo "services: installed chromium" || echo "services: chromium not installed" >&2
fi
# nginx for the tests behind a real proxy (tests/test_proxy.py starts its own,
# on a loopback port). The package must not start the stock server on port
# 80: invoke-rc.d is told no (policy-rc.d) while it installs.
if ! command -v nginx >/dev/null; then
  policy=/usr/sbin/policy-rc.d
  if [ ! -e "$policy" ]; then printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod +x "$policy"; made_policy=1; fi
  apt_install nginx-light || apt_install nginx
  [ -n "${made_policy:-}" ] && rm -f "$policy"
  command -v nginx >/dev/null && echo "services: installed nginx" || echo "services: nginx not installed" >&2
fi
exit 0
