#!/usr/bin/env bash
# start_local_slurm.sh - bring up a one-node SLURM cluster on this machine (Debian
# bookworm, root, no systemd) so that tests can run the workflow through
# `--profile profiles/slurm`. Recipe and pitfalls: shared/design/LOCAL_SLURM.md.
#
#   SLURM_LOCAL_DIR=/some/dir bash tests/slurm/start_local_slurm.sh
#   bash tests/slurm/start_local_slurm.sh --install-only   # only the Debian packages (CI set-up)
#
# Idempotent: Debian packages are installed only if missing; a daemon is started
# only if the PID recorded for it is not alive. Every daemon this script starts
# records its PID in $SLURM_LOCAL_DIR/run/<daemon>.pid; stop_local_slurm.sh
# signals exactly those PIDs.
#
# Environment:
#   SLURM_LOCAL_DIR         (required) config, state, logs, PID files, MariaDB datadir
#   SLURM_LOCAL_ACCOUNTING  slurmdbd (MariaDB + slurmdbd: sacct works) | none   [slurmdbd]
#   SLURM_LOCAL_DB_PORT     TCP port of the private MariaDB on 127.0.0.1       [13306]
#   SLURM_LOCAL_SKIP_APT    1 = never run apt-get (fail if packages are missing) [0]
#
# Outside SLURM_LOCAL_DIR, on purpose:
#   * the Debian packages (apt-get; the man-db auto-update is switched off)
#   * /etc/slurm/slurm.conf, a symlink to $SLURM_LOCAL_DIR/etc/slurm.conf: the
#     slurm-jobstep plugin drops SLURM_CONF from the environment of the inner
#     `srun`, so the config must be at the compiled-in path (LOCAL_SLURM.md G1).
#     A regular file found there is moved aside and put back by the stop script.
#   * munge's default socket /run/munge, key /etc/munge/munge.key (made by the
#     package) and log /var/log/munge: slurmctld's connection to slurmdbd always
#     uses the default socket.
set -euo pipefail

INSTALL_ONLY=0
case "${1:-}" in
    "") ;;
    --install-only) INSTALL_ONLY=1 ;;
    *) echo "usage: $0 [--install-only]" >&2; exit 2 ;;
esac
ACCT=${SLURM_LOCAL_ACCOUNTING:-slurmdbd}
DB_PORT=${SLURM_LOCAL_DB_PORT:-13306}
CLUSTER=localcluster
T0=$(date +%s%N)

log() { local ms=$(( ($(date +%s%N) - T0) / 1000000 )); printf '[start_local_slurm %3d.%01ds] %s\n' $((ms / 1000)) $((ms % 1000 / 100)) "$*"; }
die() { log "ERROR: $*"; exit 1; }

case "$ACCT" in slurmdbd|none) ;; *) die "SLURM_LOCAL_ACCOUNTING must be slurmdbd or none" ;; esac
[ "$(id -u)" = 0 ] || die "must run as root (installs packages, runs the daemons as root)"
if [ "$INSTALL_ONLY" = 1 ]; then
    D=$(mktemp -d)                      # only for the apt-get log
    trap 'rm -rf "$D"' EXIT
    mkdir -p "$D/log"
else
    : "${SLURM_LOCAL_DIR:?set SLURM_LOCAL_DIR to the directory for the cluster files}"
    mkdir -p "$SLURM_LOCAL_DIR"
    D=$(cd "$SLURM_LOCAL_DIR" && pwd -P)
    # one start at a time per directory
    mkdir -p "$D"/{etc,state,spool,log,run}
    exec 9>"$D/run/start.lock"
    flock 9
fi

# alive NAME: the PID recorded in $D/run/NAME.pid is running and is NAME (guards against PID reuse).
alive() {
    local f="$D/run/$1.pid" p
    [ -s "$f" ] || return 1
    p=$(cat "$f")
    [ -d "/proc/$p" ] || return 1
    tr '\0' ' ' < "/proc/$p/cmdline" 2>/dev/null | grep -q "$1"
}
# wait_for SECONDS DESCRIPTION CMD...: run CMD until it succeeds.
wait_for() {
    local t=$1 what=$2; shift 2
    local end=$(( $(date +%s) + t ))
    until "$@" >/dev/null 2>&1; do
        [ "$(date +%s)" -lt "$end" ] || die "timed out after ${t}s waiting for $what (logs: $D/log)"
        sleep 0.2
    done
}
# detached CMD...: run CMD with no descriptor of ours beyond stdin/out/err (the lock
# on fd 9, a caller's pipes), so that the daemons it leaves behind hold nothing open.
detached() {
    (
        for fd in /proc/$BASHPID/fd/*; do
            fd=${fd##*/}
            [ "$fd" -gt 2 ] && eval "exec $fd>&-"
        done
        exec "$@"
    )
}
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
# start_forking NAME PORT [READY_SECONDS READY_DESC READY_CMD...]: start a SLURM daemon that forks
# and writes $D/run/NAME.pid, unless the recorded one is alive; wait until it is ready and has its pid file.
start_forking() {
    local name=$1 port=$2
    shift 2
    if alive "$name"; then
        log "$name already running (pid $(cat "$D/run/$name.pid"))"
        return
    fi
    port_open "$port" && die "port $port is taken by a $name this script did not start"
    detached "$name" < /dev/null > "$D/log/$name.stdout" 2>&1  # forks; writes $D/run/$name.pid
    if [ $# -gt 0 ]; then wait_for "$@"; fi
    wait_for 10 "$name pid file" test -s "$D/run/$name.pid"
    log "$name started (pid $(cat "$D/run/$name.pid"))"
}

# --- 1. packages ------------------------------------------------------------------
PKGS=(slurmctld slurmd slurm-client munge)
[ "$ACCT" = slurmdbd ] && PKGS+=(slurmdbd mariadb-server-core mariadb-client-core)
missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    [ "${SLURM_LOCAL_SKIP_APT:-0}" = 1 ] && die "missing packages: ${missing[*]}"
    log "installing: ${missing[*]}"
    # keep the packages' postinst from starting daemons through /etc/init.d (G8)
    made_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        made_policy=1
    fi
    # the man-db trigger costs about 10 s per install and is useless here
    echo 'man-db man-db/auto-update boolean false' | debconf-set-selections 2>/dev/null || true
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq                                  # empty lists on a fresh machine (G14)
    apt-get install -y -qq --no-install-recommends "${missing[@]}" > "$D/log/apt-get.log" 2>&1 \
        || { [ "$made_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d; tail -20 "$D/log/apt-get.log"; die "apt-get install failed"; }
    [ "$made_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
    log "packages installed"
else
    log "packages already installed"
fi
versions="$(slurmctld -V), munge $(dpkg-query -W -f='${Version}' munge)"
if [ "$ACCT" = slurmdbd ]; then
    versions+=", mariadb $(dpkg-query -W -f='${Version}' mariadb-server-core)"
fi
log "versions: $versions"
[ "$INSTALL_ONLY" = 1 ] && exit 0

# --- 2. munge ------------------------------------------------------------------------
# The socket stays at libmunge's default path: slurmctld's connection to slurmdbd
# ignores AuthInfo=socket=..., so a private socket breaks accounting. munged runs
# as the user munge with the Debian key; its PID is copied to $D/run/munged.pid.
if [ ! -s /etc/munge/munge.key ]; then
    mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null \
        || dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 2>/dev/null
fi
chown munge:munge /etc/munge /etc/munge/munge.key
chmod 0700 /etc/munge
chmod 0400 /etc/munge/munge.key
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
chmod 0755 /run/munge
if alive munged; then
    log "munged already running (pid $(cat "$D/run/munged.pid"))"
elif munge -n 2>/dev/null | unmunge > /dev/null 2>&1; then
    # not ours: use it, never stop it (no PID recorded)
    log "a munged this script did not start serves /run/munge; using it"
else
    rm -f /run/munge/munged.pid
    detached runuser -u munge -- /usr/sbin/munged < /dev/null > "$D/log/munged.stdout" 2>&1  # forks; writes /run/munge/munged.pid
    wait_for 10 "munged pid file" test -s /run/munge/munged.pid
    cp /run/munge/munged.pid "$D/run/munged.pid"
    wait_for 10 munged sh -c 'munge -n | unmunge'
    log "munged started (pid $(cat "$D/run/munged.pid"))"
fi

# --- 3. config files ------------------------------------------------------------------
H=$(hostname -s)      # SlurmctldHost must equal the short hostname (G10)
# node line from the hardware (CPUs, sockets, cores, threads); memory at 90 %
NODE_HW=$(slurmd -C | head -1 | sed -e 's/ RealMemory=[0-9]*//' -e 's/^NodeName=[^ ]* //')
MEM=$(awk '/MemTotal/{print int($2 / 1024 * 0.9)}' /proc/meminfo)
if [ "$ACCT" = slurmdbd ]; then
    ACCT_LINES="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
AccountingStoreFlags=job_comment
JobAcctGatherType=jobacct_gather/linux"
else
    ACCT_LINES="AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none"
fi
cat > "$D/etc/slurm.conf.new" <<EOF
# generated by tests/slurm/start_local_slurm.sh
ClusterName=$CLUSTER
SlurmctldHost=$H(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool
SlurmctldPidFile=$D/run/slurmctld.pid
SlurmdPidFile=$D/run/slurmd.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
SchedulerType=sched/backfill
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
MinJobAge=300
$ACCT_LINES
JobCompType=jobcomp/none
NodeName=$H NodeAddr=127.0.0.1 $NODE_HW RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
mv "$D/etc/slurm.conf.new" "$D/etc/slurm.conf"
# the compiled-in default path must work (G1)
mkdir -p /etc/slurm
if [ -e /etc/slurm/slurm.conf ] && [ ! -L /etc/slurm/slurm.conf ]; then
    backup="/etc/slurm/slurm.conf.before-local-slurm.$(date +%s)"
    mv /etc/slurm/slurm.conf "$backup"
    echo "$backup" > "$D/run/slurm.conf.backup"
    log "moved the existing /etc/slurm/slurm.conf to $backup"
fi
ln -sfn "$D/etc/slurm.conf" /etc/slurm/slurm.conf
export SLURM_CONF="$D/etc/slurm.conf"   # slurmdbd looks for slurmdbd.conf beside it (G11)

# --- 4. MariaDB + slurmdbd --------------------------------------------------------------
if [ "$ACCT" = slurmdbd ]; then
    mkdir -p "$D/mysql"
    cat > "$D/etc/my.cnf" <<EOF
[mysqld]
user=root
datadir=$D/mysql
socket=$D/run/mysqld.sock
pid-file=$D/run/mariadbd.pid
log-error=$D/log/mariadbd.log
bind-address=127.0.0.1
port=$DB_PORT
skip-name-resolve
innodb_buffer_pool_size=256M
innodb_log_file_size=64M
innodb_lock_wait_timeout=900
max_allowed_packet=16M
[client]
socket=$D/run/mysqld.sock
EOF
    if alive mariadbd; then
        log "mariadbd already running (pid $(cat "$D/run/mariadbd.pid"))"
    else
        port_open "$DB_PORT" && die "port $DB_PORT is taken by another process (set SLURM_LOCAL_DB_PORT)"
        if [ ! -d "$D/mysql/mysql" ]; then
            mariadb-install-db --defaults-file="$D/etc/my.cnf" --auth-root-authentication-method=socket \
                --skip-test-db > "$D/log/mariadb-install-db.log" 2>&1 \
                || { tail -20 "$D/log/mariadb-install-db.log"; die "mariadb-install-db failed"; }
            log "MariaDB datadir initialised"
        fi
        # mariadbd does not daemonize: run it detached in its own session; it writes its pid-file (G12)
        rm -f "$D/run/mariadbd.pid"
        detached setsid --fork mariadbd --defaults-file="$D/etc/my.cnf" > "$D/log/mariadbd.stdout" 2>&1 < /dev/null
        wait_for 60 mariadbd mariadb --defaults-file="$D/etc/my.cnf" -uroot -e 'select 1'
        wait_for 10 "mariadbd pid file" test -s "$D/run/mariadbd.pid"
        log "mariadbd started (pid $(cat "$D/run/mariadbd.pid"))"
    fi
    mariadb --defaults-file="$D/etc/my.cnf" -uroot -e "
        CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;"
    cat > "$D/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=root
DebugLevel=info
LogFile=$D/log/slurmdbd.log
PidFile=$D/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
    chmod 600 "$D/etc/slurmdbd.conf"            # slurmdbd refuses a readable one (G11)
    start_forking slurmdbd 6819 30 "slurmdbd on :6819" port_open 6819
fi

# --- 5. slurmctld + slurmd ----------------------------------------------------------------
start_forking slurmctld 6817 30 slurmctld scontrol ping
start_forking slurmd 6818
wait_for 60 "node $H idle" sh -c "sinfo -h -n $H -o %T | grep -qE '^(idle|mixed|allocated)'"
if [ "$ACCT" = slurmdbd ]; then
    # slurmctld registers the cluster (and the root account) in slurmdbd by itself
    wait_for 60 "cluster registered in slurmdbd" sh -c "sacctmgr -n -P list cluster format=cluster | grep -qx $CLUSTER"
    wait_for 30 sacct sacct -n -X -S now-1minute
fi
sinfo
log "cluster up (accounting=$ACCT, /etc/slurm/slurm.conf -> $D/etc/slurm.conf)"
