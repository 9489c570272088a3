#!/usr/bin/env bash
# Postfix as a relay, measured end to end (issue 19): a private Postfix
# smtpd on loopback (set up as tests/common/mod.rs does, see
# shared/notes/postfix-smtpd-on-loopback.md) relays every message to the
# sink of `smtpstorm bench --through`; one run per rate.
#
# Usage: scripts/relay-bench.sh BIN OUTDIR [RATE...]
#   BIN     the smtpstorm binary
#   OUTDIR  where the JSON reports and relay-postfix.md go
#   RATE    open-loop rates in messages/s (default: 100 200 400 800)
# Env: DURATION (default 20s), DRAIN (default 60s), SIZE (default 1KiB).
# Needs root (Postfix). Traffic stays on 127.0.0.1; every run is bounded by
# its duration and drain. The Postfix instance is stopped and its entry in
# alternate_config_directories removed on exit.
set -euo pipefail
bin=${1:?usage: relay-bench.sh BIN OUTDIR [RATE...]}
out=${2:?usage: relay-bench.sh BIN OUTDIR [RATE...]}
shift 2
rates=("$@")
[ ${#rates[@]} -gt 0 ] || rates=(100 200 400 800)
duration=${DURATION:-20s}
drain=${DRAIN:-60s}
size=${SIZE:-1KiB}
mkdir -p "$out"

free_port() {
  python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'
}

lock=/tmp/smtpstorm-postfix-main-cf.lock
root=$(mktemp -d /tmp/smtpstorm-postfix-relay.XXXXXX)
etc=$root/etc
pf_port=$(free_port)
sink_port=$(free_port)

alt_dirs() { postconf -h alternate_config_directories 2>/dev/null | tr ', ' '\n\n' | grep -v '^$' || true; }
set_alt_dirs() {
  if [ -z "$1" ]; then postconf -X alternate_config_directories; else postconf -e "alternate_config_directories = $1"; fi
}

cleanup() {
  postfix -c "$etc" stop >/dev/null 2>&1 || true
  (
    flock -w 60 9
    keep=$(alt_dirs | grep -vx "$etc" | tr '\n' ' ' | sed 's/ $//')
    set_alt_dirs "$keep"
  ) 9>"$lock"
  rm -rf "$root"
}
trap cleanup EXIT

mkdir -p "$etc" "$root/data" "$root/queue"
chmod 755 "$root"
chown postfix "$root/data"
cat >"$etc/main.cf" <<EOF
compatibility_level = 3.6
queue_directory = $root/queue
data_directory = $root/data
maillog_file = $root/maillog
maillog_file_prefixes = $root
myhostname = postfix.smtpstorm.test
mydestination =
mynetworks = 127.0.0.0/8
inet_interfaces = loopback-only
inet_protocols = ipv4
smtpd_peername_lookup = no
smtp_dns_support_level = disabled
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
default_transport = smtp
relay_transport = smtp
local_transport = discard
relayhost = [127.0.0.1]:$sink_port
smtp_tls_security_level = none
alias_maps =
alias_database =
smtpd_client_connection_rate_limit = 0
smtpd_client_message_rate_limit = 0
default_process_limit = 100
EOF
awk -v port="$pf_port" '/^smtp +inet/ { print "127.0.0.1:" port " inet n - n - - smtpd"; next } { print }' \
  /etc/postfix/master.cf >"$etc/master.cf"
(
  flock -w 60 9
  dirs=$(alt_dirs | tr '\n' ' ')
  set_alt_dirs "$(echo "$dirs $etc" | sed 's/^ *//')"
) 9>"$lock"
postfix -c "$etc" start
for _ in $(seq 1 200); do (exec 3<>"/dev/tcp/127.0.0.1/$pf_port") 2>/dev/null && break; sleep 0.1; done

postconf -d mail_version | sed 's/^/# /'
for r in "${rates[@]}"; do
  "$bin" bench --through "127.0.0.1:$pf_port" --sink-listen "127.0.0.1:$sink_port" \
    --rate "$r" --duration "$duration" --drain "$drain" --size "$size" --quiet \
    --max-failed 100% --allow-invalid --json "$out/relay-postfix-$r.json" >"$out/relay-postfix-$r.txt" 2>&1 || true
  echo "rate $r: $(grep -m1 'end to end:' "$out/relay-postfix-$r.txt" || echo 'no e2e line')"
done
