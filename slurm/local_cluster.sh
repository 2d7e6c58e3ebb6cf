#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine, for trying the suite and for its tests.
#
#   slurm/local_cluster.sh start    # munged + slurmctld + slurmd; waits until the node is idle
#   slurm/local_cluster.sh status   # sinfo + squeue
#   slurm/local_cluster.sh stop     # stops the daemons this script started
#
# It uses Debian's packages (apt-get install -y slurm-wlm munge), needs root (the daemons run as
# root: SlurmUser=root) and no systemd or cgroups, so it works inside a container.
# Every command is idempotent: `start` on a running cluster only checks that it answers.
#
# Settings (environment variables):
#   SSL_COLORIZE_SLURM_DIR   state, spool, logs and pid files  (default /var/spool/ssl_colorize_slurm)
#   SSL_COLORIZE_SLURM_CPUS  CPUs the node announces            (default: 4 x nproc, at least 8)
#   SLURM_CONF               where slurm.conf is written         (default /etc/slurm/slurm.conf;
#                            clients read SLURM_CONF too, so export it if you change it)
#
# Oversubscription: the node announces more CPUs than the machine has cores
# (SlurmdParameters=config_overrides makes slurmd accept that), so a sweep of several array tasks and
# a two-task DDP job can run side by side on a 2-core machine; the tests' jobs are tiny.
set -euo pipefail

STATE_DIR="${SSL_COLORIZE_SLURM_DIR:-/var/spool/ssl_colorize_slurm}"
CONF="${SLURM_CONF:-/etc/slurm/slurm.conf}"
MARKER="# Written by ssl_colorize slurm/local_cluster.sh"
NODE=localhost
CTLD_PID="$STATE_DIR/slurmctld.pid"
SLURMD_PID="$STATE_DIR/slurmd.pid"
MUNGE_KEY=/etc/munge/munge.key
MUNGE_SOCKET_DIR=/run/munge
MUNGE_STARTED_FLAG="$STATE_DIR/munged.started-by-us"
START_TIMEOUT_S="${SSL_COLORIZE_SLURM_START_TIMEOUT_S:-90}"

log() { echo "[local_cluster] $*" >&2; }
die() { log "error: $*"; exit 1; }

require_tools() {
    local missing=()
    for tool in munged munge unmunge slurmctld slurmd sinfo squeue scontrol sbatch srun; do
        command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        die "missing ${missing[*]}; install them with: apt-get install -y slurm-wlm munge"
    fi
}

require_root() {
    [ "$(id -u)" -eq 0 ] || die "must run as root (the local cluster runs its daemons as root)"
}

pid_alive() {  # pid_alive PIDFILE -> 0 when the process in PIDFILE is running
    local pid
    pid="$(cat "$1" 2>/dev/null)" && [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null
}

munge_works() {
    munge -n 2>/dev/null | unmunge >/dev/null 2>&1
}

start_munge() {
    if munge_works; then
        return 0
    fi
    if [ ! -s "$MUNGE_KEY" ]; then
        log "creating munge key $MUNGE_KEY"
        mkdir -p "$(dirname "$MUNGE_KEY")"
        if command -v mungekey >/dev/null 2>&1; then
            mungekey --create --keyfile="$MUNGE_KEY"
        else
            dd if=/dev/urandom of="$MUNGE_KEY" bs=1024 count=1 status=none
        fi
    fi
    # munged refuses a key or directories that other users could read or write.
    chown munge:munge "$MUNGE_KEY" /etc/munge
    chmod 0400 "$MUNGE_KEY"
    chmod 0700 /etc/munge
    mkdir -p "$MUNGE_SOCKET_DIR" /var/lib/munge /var/log/munge
    chown munge:munge "$MUNGE_SOCKET_DIR" /var/lib/munge /var/log/munge
    chmod 0755 "$MUNGE_SOCKET_DIR"
    log "starting munged"
    runuser -u munge -- munged
    touch "$MUNGE_STARTED_FLAG"
    for _ in $(seq 50); do
        munge_works && return 0
        sleep 0.2
    done
    die "munged does not answer; see /var/log/munge/munged.log"
}

write_conf() {
    # Writes slurm.conf to a temporary file and prints its path; refuses to touch a slurm.conf that
    # this script did not write (a real cluster's configuration).
    if [ -f "$CONF" ] && ! head -n 1 "$CONF" | grep -qF "$MARKER"; then
        die "$CONF exists and was not written by this script; set SLURM_CONF to another path"
    fi
    local cores mem_mb cpus ctl_host
    cores="$(nproc)"
    cpus="${SSL_COLORIZE_SLURM_CPUS:-$(( cores * 4 > 8 ? cores * 4 : 8 ))}"
    case "$cpus" in ''|*[!0-9]*) die "SSL_COLORIZE_SLURM_CPUS must be a positive integer, got '$cpus'";; esac
    # Announce 90% of the memory so that slurmd's own check never finds less than configured.
    mem_mb="$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)"
    # slurmctld only runs on the host named by SlurmctldHost, so it must be this host's short name.
    ctl_host="$(hostname -s)"
    local tmp
    tmp="$(mktemp "$STATE_DIR/slurm.conf.XXXXXX")"
    cat >"$tmp" <<EOF
$MARKER
# Single-node cluster for trying ssl_colorize and for its tests (tests marked 'slurm').
ClusterName=sslcolorize
SlurmctldHost=${ctl_host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
# No systemd or cgroups in a container: track processes through /proc, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
# Requeue (scontrol requeue, submitit's checkpoint-and-requeue) must be allowed; nothing preempts.
JobRequeue=1
PreemptMode=OFF
ReturnToService=2
# Accept the CPU count below even though the machine has fewer cores (oversubscription on purpose).
SlurmdParameters=config_overrides
# Short waits so that tests of cancellation and requeue stay quick.
KillWait=5
# A requeued job waits cred_expire seconds before it may start again (120 s by default).
AuthInfo=cred_expire=10
MinJobAge=300
MailProg=/bin/true
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/slurmd
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$STATE_DIR/log/slurmctld.log
SlurmdLogFile=$STATE_DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName=$NODE NodeAddr=127.0.0.1 NodeHostname=$NODE CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
    echo "$tmp"
}

node_state() {
    sinfo -h -N -n "$NODE" -o '%T' 2>/dev/null | head -n 1
}

slurmd_start_time() {  # when the running slurmd registered with slurmctld, in seconds since the epoch
    local stamp
    stamp="$(scontrol show node "$NODE" 2>/dev/null | grep -o 'SlurmdStartTime=[^ ]*' | cut -d= -f2)"
    date -d "$stamp" +%s 2>/dev/null || echo 0
}

wait_until_idle() {  # wait_until_idle [EPOCH]: also wait for a slurmd started at or after EPOCH to register
    local registered_after="${1:-0}"
    local deadline=$(( $(date +%s) + START_TIMEOUT_S )) state resumed=0
    while [ "$(date +%s)" -lt "$deadline" ]; do
        # slurmctld restores the node's last state from its state files before slurmd has registered.
        if [ "$registered_after" -gt 0 ] && [ "$(slurmd_start_time)" -lt "$registered_after" ]; then
            state="unregistered"
            sleep 0.5
            continue
        fi
        state="$(node_state || true)"
        case "$state" in
            idle|mixed|allocated|completing)
                log "node $NODE is $state"
                return 0;;
            down*|drain*|drained*|fail*)
                if [ "$resumed" -eq 0 ]; then
                    log "node $NODE is $state; resuming it"
                    scontrol update nodename="$NODE" state=resume || true
                    resumed=1
                fi;;
        esac
        sleep 1
    done
    die "node $NODE did not become idle within ${START_TIMEOUT_S}s (state '${state:-none}'); see $STATE_DIR/log/"
}

start() {
    require_root
    require_tools
    mkdir -p "$STATE_DIR/ctld" "$STATE_DIR/slurmd" "$STATE_DIR/log" "$(dirname "$CONF")"
    start_munge
    local new_conf restart=0
    new_conf="$(write_conf)"
    if [ -f "$CONF" ] && cmp -s "$new_conf" "$CONF"; then
        rm -f "$new_conf"
    else
        mv -f "$new_conf" "$CONF"
        chmod 0644 "$CONF"
        log "wrote $CONF"
        restart=1
    fi
    if [ "$restart" -eq 1 ] && { pid_alive "$CTLD_PID" || pid_alive "$SLURMD_PID"; }; then
        log "configuration changed; restarting the daemons"
        stop_slurm
    fi
    if ! pid_alive "$CTLD_PID"; then
        log "starting slurmctld"
        SLURM_CONF="$CONF" slurmctld
    fi
    # slurmctld must answer before slurmd registers with it.
    local deadline=$(( $(date +%s) + START_TIMEOUT_S ))
    until SLURM_CONF="$CONF" scontrol ping 2>/dev/null | grep -q 'is UP'; do
        [ "$(date +%s)" -lt "$deadline" ] || die "slurmctld does not answer; see $STATE_DIR/log/slurmctld.log"
        sleep 0.5
    done
    local slurmd_started=0
    if ! pid_alive "$SLURMD_PID"; then
        log "starting slurmd"
        slurmd_started="$(date +%s)"
        SLURM_CONF="$CONF" slurmd -N "$NODE"
    fi
    SLURM_CONF="$CONF" wait_until_idle "$slurmd_started"
    if [ "$CONF" != /etc/slurm/slurm.conf ]; then
        log "export SLURM_CONF=$CONF so that sinfo, sbatch and the tests find this cluster"
    fi
}

stop_daemon() {  # stop_daemon NAME PIDFILE
    local name="$1" pidfile="$2"
    if pid_alive "$pidfile"; then
        log "stopping $name"
        kill "$(cat "$pidfile" 2>/dev/null)" 2>/dev/null || true
        for _ in $(seq 50); do
            pid_alive "$pidfile" || break
            sleep 0.2
        done
        if pid_alive "$pidfile"; then
            kill -9 "$(cat "$pidfile" 2>/dev/null)" 2>/dev/null || true
        fi
    fi
    rm -f "$pidfile"
}

stop_slurm() {
    stop_daemon slurmd "$SLURMD_PID"
    stop_daemon slurmctld "$CTLD_PID"
}

stop() {
    require_root
    stop_slurm
    if [ -f "$MUNGE_STARTED_FLAG" ]; then
        log "stopping munged"
        munged --stop >/dev/null 2>&1 || true
        rm -f "$MUNGE_STARTED_FLAG"
    fi
    log "stopped (state kept in $STATE_DIR)"
}

status() {
    local rc=0
    pid_alive "$CTLD_PID" && log "slurmctld running (pid $(cat "$CTLD_PID"))" || { log "slurmctld not running"; rc=1; }
    pid_alive "$SLURMD_PID" && log "slurmd running (pid $(cat "$SLURMD_PID"))" || { log "slurmd not running"; rc=1; }
    munge_works && log "munge works" || { log "munge does not work"; rc=1; }
    if [ "$rc" -eq 0 ]; then
        SLURM_CONF="$CONF" sinfo
        SLURM_CONF="$CONF" squeue
    fi
    return "$rc"
}

case "${1:-}" in
    start) start;;
    stop) stop;;
    status) status;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2;;
esac
