#!/usr/bin/env bash
# Daily backup for cron users, instead of the daemon's scheduler: `llmsvc backup` (written,
# then verified), then `llmsvc jobs run backup-cleanup` (backups past backup_retention_days).
# Settings come from LLMSVC_* variables or LLMSVC_CONFIG, as for the daemon. Exits non-zero,
# with llmsvc's message, when either step fails; both steps are stored in maintenance_runs.
#
# In /etc/cron.d/llmsvc (one line), as the service user README's "Install as a service" makes:
#
#   0 2 * * *  llmsvc  XDG_STATE_HOME=/var/lib LLMSVC_CONFIG=/etc/llmsvc/llmsvc.toml LLMSVC=/opt/llmsvc/venv/bin/llmsvc /path/to/llmsvc-checkout/scripts/daily_backup.sh
#
# LLMSVC names the llmsvc command (default: on PATH, else this checkout's .venv).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
llmsvc=${LLMSVC:-$(command -v llmsvc || echo "$here/../.venv/bin/llmsvc")}

"$llmsvc" backup
"$llmsvc" jobs run backup-cleanup
