#!/bin/sh
# Prints the manifests of one distributed run, ready for kubectl:
#   scripts/k8s/render.sh [INSTANCES] [DURATION_SECS] | kubectl apply -f -
# INSTANCES (default 4) is the one place the instance count is set: it
# becomes the Job's completions and parallelism, the N of every pod's
# --instance I/N and the number of reports the merge step waits for.
# The run starts START_IN seconds from now (environment, default 120: time
# for the pods to be scheduled and the image pulled); a pod that starts
# after that says so and its report records it, and merge checks the skew.
# Apply it again for a new run after `kubectl delete job smtpstorm-blast
# smtpstorm-merge` (each run writes into its own directory).
set -eu
instances=${1:-4}
duration=${2:-60}
start_in=${START_IN:-120}
case $instances in '' | *[!0-9]* | 0) echo "render.sh: INSTANCES must be a positive integer, not '$instances'" >&2; exit 2 ;; esac
case $duration in '' | *[!0-9]* | 0) echo "render.sh: DURATION_SECS must be a positive integer, not '$duration'" >&2; exit 2 ;; esac
start_at=$(( $(date +%s) + start_in ))
dir=$(dirname "$0")
first=1
for f in results-pvc.yaml blast-indexed-job.yaml merge-job.yaml; do
  [ "$first" = 1 ] || echo ---
  first=0
  sed -e "s/__INSTANCES__/$instances/g" -e "s/__START_AT__/$start_at/g" \
      -e "s/__DURATION__/$duration/g" "$dir/$f"
done
