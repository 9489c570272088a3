#!/usr/bin/env bash
# Installs the real SMTP peers the tests talk to (Debian packages), without
# prompts, and everything each peer needs for what the tests use it for,
# plus the tools that check smtpstorm's outputs (a browser for the HTML
# report, XML and Prometheus parsers, shells and man for completions).
# Idempotent: each check asks for a capability the tests use (a program, a
# Perl or Python module), not only for a package name, so a peer installed
# without its optional parts is completed. Prints what it installs.
set -euo pipefail

need=()
want() { need+=("$1"); }
have_perl_module() { perl -M"$1" -e 1 >/dev/null 2>&1; }
have_py_module() { /usr/bin/python3 -c "import $1" >/dev/null 2>&1; }

# Postfix: smtp-sink, smtp-source (load peers) and smtpd, postconf (a real MTA).
[ -x /usr/sbin/smtp-sink ] && [ -x /usr/sbin/smtp-source ] && command -v postconf >/dev/null 2>&1 ||
  want postfix
# Dovecot's LMTP server: the blaster's peer over a unix socket (a private
# instance per test, tests/unix_sockets.rs). dovecot-core has the master
# and doveadm, dovecot-lmtpd the lmtp service.
[ -x /usr/sbin/dovecot ] || want dovecot-core
[ -x /usr/lib/dovecot/lmtp ] || want dovecot-lmtpd
# swaks, and what its options need: --tls/--tlsc need Net::SSLeay (a
# Recommends of swaks, so --no-install-recommends leaves it out: "TLS not
# available: requires Net::SSLeay"); IPv6 targets need IO::Socket::INET6.
command -v swaks >/dev/null 2>&1 || want swaks
have_perl_module Net::SSLeay || want libnet-ssleay-perl
have_perl_module IO::Socket::INET6 || want libio-socket-inet6-perl
# Python: smtplib is in the standard library; aiosmtpd is a test server.
[ -x /usr/bin/python3 ] || want python3
have_py_module aiosmtpd || want python3-aiosmtpd
command -v openssl >/dev/null 2>&1 || want openssl
# ip (network namespaces), ss (socket states), tc (netem).
command -v ip >/dev/null 2>&1 && command -v ss >/dev/null 2>&1 && command -v tc >/dev/null 2>&1 ||
  want iproute2
# flock serializes the tests' edits of Postfix's main.cf (util-linux is
# essential on Debian; checked so a trimmed image says so here).
command -v flock >/dev/null 2>&1 || want util-linux

# Headless Chromium and its WebDriver: the HTML report is checked in a real
# browser (tests/html_report.rs drives chromedriver over W3C WebDriver).
command -v chromium >/dev/null 2>&1 || want chromium
command -v chromedriver >/dev/null 2>&1 || want chromium-driver
# lxml validates --junit output against the JUnit XML schema; the Prometheus
# client library's parser reads the /metrics exposition.
have_py_module lxml || want python3-lxml
have_py_module prometheus_client || want python3-prometheus-client
# Shell completions are loaded by each shell; man pages are rendered by
# man-db's man and groff.
command -v zsh >/dev/null 2>&1 || want zsh
command -v fish >/dev/null 2>&1 || want fish
command -v man >/dev/null 2>&1 || want man-db
command -v groff >/dev/null 2>&1 || want groff-base
# kubernetes-validate checks scripts/k8s/ against the Kubernetes schemas it
# ships (tests/k8s_manifests.rs). It is not packaged by Debian: pip installs
# it below, after apt has provided pip.
have_kv() { command -v kubernetes-validate >/dev/null 2>&1; }
have_kv || /usr/bin/python3 -m pip --version >/dev/null 2>&1 || want python3-pip

if [ ${#need[@]} -eq 0 ] && have_kv; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "install-peers: need root to install ${need[*]} kubernetes-validate" >&2
  exit 1
fi
if [ ${#need[@]} -gt 0 ]; then
echo "install-peers: installing ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
# Postfix asks how to configure itself; "Internet Site" gives the default
# /etc/postfix/main.cf that a private instance must be listed in.
echo "postfix postfix/main_mailer_type select Internet Site" | debconf-set-selections
echo "postfix postfix/mailname string smtpstorm.localhost" | debconf-set-selections
apt-get update -qq
# Each capability above names its package, so recommends are not needed.
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
# The package may try to start a system Postfix on port 25; the tests never use it.
postfix stop >/dev/null 2>&1 || true
# Likewise a system Dovecot (the tests start their own, by PID).
if [ -x /usr/sbin/dovecot ]; then /usr/sbin/dovecot stop >/dev/null 2>&1 || true; fi
fi
# Debian's Python is "externally managed" (PEP 668): pip refuses to install
# into it without --break-system-packages. The package only adds its own
# module and script (to /usr/local), nothing Debian's packages rely on.
if ! have_kv; then
  echo "install-peers: installing kubernetes-validate (pip)" >&2
  /usr/bin/python3 -m pip install -q --break-system-packages --root-user-action=ignore \
    'kubernetes-validate==1.37.0'
fi

# Check that what was installed now works, so a gap fails here and not in a test.
missing=()
[ -x /usr/sbin/smtp-sink ] || missing+=(smtp-sink)
[ -x /usr/sbin/dovecot ] || missing+=(dovecot)
[ -x /usr/lib/dovecot/lmtp ] || missing+=(dovecot-lmtpd)
command -v swaks >/dev/null 2>&1 || missing+=(swaks)
have_perl_module Net::SSLeay || missing+=(perl:Net::SSLeay)
have_perl_module IO::Socket::INET6 || missing+=(perl:IO::Socket::INET6)
have_py_module aiosmtpd || missing+=(python3:aiosmtpd)
command -v tc >/dev/null 2>&1 || missing+=(tc)
command -v flock >/dev/null 2>&1 || missing+=(flock)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromedriver)
have_py_module lxml || missing+=(python3:lxml)
have_py_module prometheus_client || missing+=(python3:prometheus_client)
command -v zsh >/dev/null 2>&1 || missing+=(zsh)
command -v fish >/dev/null 2>&1 || missing+=(fish)
command -v man >/dev/null 2>&1 || missing+=(man)
command -v groff >/dev/null 2>&1 || missing+=(groff)
have_kv || missing+=(kubernetes-validate)
if [ ${#missing[@]} -gt 0 ]; then
  echo "install-peers: still missing after install: ${missing[*]}" >&2
  exit 1
fi
