#!/usr/bin/env bash
# The same split over plain machines with pdsh: host i of N runs instance i/N,
# all starting at the same UNIX second, then the reports are merged.
# Usage: scripts/k8s/pdsh-example.sh TARGET host1 host2 ...
set -euo pipefail
target=$1; shift
hosts=("$@")
n=${#hosts[@]}
start=$(( $(date +%s) + 30 ))
for i in "${!hosts[@]}"; do
  pdsh -w "${hosts[$i]}" \
    "smtpstorm blast $target --instance $i/$n --start-at $start --rate 10k \
     --duration 60s --json /tmp/blast-$i.json" &
done
wait
for i in "${!hosts[@]}"; do scp "${hosts[$i]}:/tmp/blast-$i.json" .; done
smtpstorm merge blast-*.json --json merged.json --assert 'errors == 0'
