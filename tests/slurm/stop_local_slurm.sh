#!/usr/bin/env bash
# stop_local_slurm.sh - stop the one-node cluster that start_local_slurm.sh started,
# signalling only the PIDs recorded in $SLURM_LOCAL_DIR/run/<daemon>.pid.
#
#   SLURM_LOCAL_DIR=/some/dir bash tests/slurm/stop_local_slurm.sh [--purge | --purge-data]
#
#   --purge       also delete $SLURM_LOCAL_DIR entirely
#   --purge-data  also delete the state, spool and MariaDB datadir; keep etc/ and log/
#
# Order: cancel the jobs -> slurmd, slurmctld -> slurmdbd, munged -> mariadbd.
# A PID is signalled only while /proc/<pid>/cmdline still names the expected
# daemon (guards against PID reuse). Idempotent; packages stay installed.
set -uo pipefail

: "${SLURM_LOCAL_DIR:?set SLURM_LOCAL_DIR to the directory given to start_local_slurm.sh}"
[ -d "$SLURM_LOCAL_DIR" ] || { echo "[stop_local_slurm] $SLURM_LOCAL_DIR does not exist: nothing to stop"; exit 0; }
D=$(cd "$SLURM_LOCAL_DIR" && pwd -P)
PURGE=
case "${1:-}" in
    "") ;;
    --purge|--purge-data) PURGE=$1 ;;
    *) echo "usage: $0 [--purge | --purge-data]" >&2; exit 2 ;;
esac
T0=$(date +%s%N)
log() { local ms=$(( ($(date +%s%N) - T0) / 1000000 )); printf '[stop_local_slurm %3d.%01ds] %s\n' $((ms / 1000)) $((ms % 1000 / 100)) "$*"; }

# pid_of NAME: print the recorded PID if it is alive and still that daemon.
pid_of() {
    local f="$D/run/$1.pid" p
    [ -s "$f" ] || return 1
    p=$(cat "$f")
    [[ "$p" =~ ^[0-9]+$ ]] || return 1
    [ -d "/proc/$p" ] || return 1
    tr '\0' ' ' < "/proc/$p/cmdline" 2>/dev/null | grep -q "$1" || return 1
    echo "$p"
}

# stop_daemons NAME...: SIGTERM the recorded PIDs together, wait for all to exit,
# SIGKILL whatever is left after 30 s.
stop_daemons() {
    local name p i left
    local -A pids=()
    for name in "$@"; do
        if p=$(pid_of "$name"); then
            pids[$name]=$p
            kill -TERM "$p" 2>/dev/null
        else
            [ -e "$D/run/$name.pid" ] && log "$name: recorded pid not running"
            rm -f "$D/run/$name.pid"
        fi
    done
    for ((i = 0; i < 300; i++)); do
        left=0
        for name in "${!pids[@]}"; do [ -d "/proc/${pids[$name]}" ] && left=1; done
        [ "$left" = 0 ] && break
        sleep 0.1
    done
    for name in "${!pids[@]}"; do
        p=${pids[$name]}
        if [ -d "/proc/$p" ]; then
            log "$name ($p) ignored SIGTERM for 30 s, sending SIGKILL"
            kill -KILL "$p" 2>/dev/null
            sleep 0.5
        fi
        rm -f "$D/run/$name.pid"
        log "$name ($p) stopped"
    done
}

# 1. cancel every job of this cluster, so no slurmstepd outlives slurmd (G9)
if pid_of slurmctld > /dev/null; then
    export SLURM_CONF="$D/etc/slurm.conf"
    jobs=$(squeue -h -o %i 2>/dev/null | tr '\n' ' ')
    if [ -n "${jobs// /}" ]; then
        log "cancelling jobs: $jobs"
        # shellcheck disable=SC2086
        scancel $jobs 2>/dev/null
        for ((i = 0; i < 150; i++)); do
            [ -z "$(squeue -h -t R,CG -o %i 2>/dev/null)" ] && break
            sleep 0.2
        done
    fi
fi

stop_daemons slurmd slurmctld    # slurmctld sends its last records to slurmdbd
stop_daemons slurmdbd munged     # before the database goes
stop_daemons mariadbd

# the config symlink points into $D: remove it, and put back a config it replaced
if [ -L /etc/slurm/slurm.conf ] && [ "$(readlink /etc/slurm/slurm.conf)" = "$D/etc/slurm.conf" ]; then
    rm -f /etc/slurm/slurm.conf
    if [ -s "$D/run/slurm.conf.backup" ]; then
        backup=$(cat "$D/run/slurm.conf.backup")
        [ -e "$backup" ] && mv "$backup" /etc/slurm/slurm.conf && log "restored /etc/slurm/slurm.conf"
        rm -f "$D/run/slurm.conf.backup"
    fi
fi
case "$PURGE" in
    --purge) rm -rf "$D"; log "purged $D" ;;
    --purge-data) rm -rf "$D"/{state,spool,mysql}; log "purged the state and database under $D" ;;
esac
log "done"
