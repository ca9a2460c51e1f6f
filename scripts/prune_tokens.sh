#!/usr/bin/env bash
# Retention for cron users, instead of the daemon's scheduler: `llmsvc prune` runs the same
# prune job, so it creates PostgreSQL's daily token partitions ahead, then removes requests
# older than retention_days with their attempts and tokens (on PostgreSQL, whole daily
# partitions). Arguments go to `llmsvc prune` (--older-than DAYS, --before TIME, --dry-run).
# Settings come from LLMSVC_* variables or LLMSVC_CONFIG. Exits non-zero, with llmsvc's
# message, on failure.
#
# In /etc/cron.d/llmsvc (one line), as the service user README's "Install as a service" makes:
#
#   0 3 * * sun  llmsvc  XDG_STATE_HOME=/var/lib LLMSVC_CONFIG=/etc/llmsvc/llmsvc.toml LLMSVC=/opt/llmsvc/venv/bin/llmsvc /path/to/llmsvc-checkout/scripts/prune_tokens.sh
#
# LLMSVC names the llmsvc command (default: on PATH, else this checkout's .venv).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
llmsvc=${LLMSVC:-$(command -v llmsvc || echo "$here/../.venv/bin/llmsvc")}

"$llmsvc" prune "$@"
