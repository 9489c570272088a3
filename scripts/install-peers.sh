#!/usr/bin/env bash
# Installs the real SMTP peers the tests talk to (Debian packages), without
# prompts. Idempotent: does nothing when everything is already there.
set -euo pipefail

need=()
command -v smtp-sink >/dev/null 2>&1 || [ -x /usr/sbin/smtp-sink ] || need+=(postfix)
command -v swaks >/dev/null 2>&1 || need+=(swaks)
/usr/bin/python3 -c 'import aiosmtpd' >/dev/null 2>&1 || need+=(python3-aiosmtpd)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v ss >/dev/null 2>&1 || need+=(iproute2)

if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
echo "install-peers: installing ${need[*]}" >&2
if [ "$(id -u)" -ne 0 ]; then
  echo "install-peers: need root to apt-get install ${need[*]}" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
# Postfix asks how to configure itself; "Internet Site" gives the default
# /etc/postfix/main.cf that a private instance must be listed in.
echo "postfix postfix/main_mailer_type select Internet Site" | debconf-set-selections
echo "postfix postfix/mailname string smtpstorm.localhost" | debconf-set-selections
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
# The package may try to start a system Postfix on port 25; the tests never use it.
postfix stop >/dev/null 2>&1 || true
