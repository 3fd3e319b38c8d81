#!/usr/bin/env bash
# Passwordless ssh to localhost and pdsh, for the `deepspeed --launcher pdsh` test (run as root; idempotent).
#
#   bash .ci/ssh_up.sh            # install if missing, key, authorize, start sshd, check `ssh localhost`
#   bash .ci/ssh_up.sh --down     # stop the sshd this script started
#
# What it does:
#   1. apt-get installs openssh-server, openssh-client and pdsh if `sshd` or `pdsh` is missing.
#   2. Makes root an ed25519 key (~/.ssh/id_ed25519) if it has none and authorizes it for itself.
#   3. Starts sshd on 127.0.0.1 (pid file /run/sshd-ci.pid) unless port 22 is served already.
#   4. Records the host keys of localhost and 127.0.0.1, then checks that `ssh localhost` runs a command.
set -euo pipefail

PIDFILE=/run/sshd-ci.pid
SSH=(ssh -o BatchMode=yes -o ConnectTimeout=5)

if [[ "${1:-}" == "--down" ]]; then
    [[ -f $PIDFILE ]] && kill "$(cat $PIDFILE)" 2>/dev/null || true
    exit 0
fi

if [[ $(id -u) -ne 0 ]]; then
    echo "ssh_up.sh: must run as root (it installs packages and starts sshd)" >&2
    exit 1
fi

if [[ ! -x /usr/sbin/sshd ]] || ! command -v pdsh >/dev/null; then
    echo "ssh_up.sh: installing openssh-server and pdsh from apt"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends openssh-server openssh-client pdsh >/dev/null
fi

# --- root's key, authorized for root
mkdir -p ~/.ssh && chmod 0700 ~/.ssh
[[ -f ~/.ssh/id_ed25519 ]] || ssh-keygen -q -t ed25519 -N "" -f ~/.ssh/id_ed25519
touch ~/.ssh/authorized_keys && chmod 0600 ~/.ssh/authorized_keys
grep -qxF "$(cat ~/.ssh/id_ed25519.pub)" ~/.ssh/authorized_keys || cat ~/.ssh/id_ed25519.pub >> ~/.ssh/authorized_keys

# --- sshd: host keys, privilege-separation directory; started unless something serves port 22 already
listening() { (exec 3<>/dev/tcp/127.0.0.1/22) 2>/dev/null; }
if ! listening; then
    ssh-keygen -A
    mkdir -p /run/sshd && chmod 0755 /run/sshd
    # loopback only, keys only: this daemon exists for the tests
    /usr/sbin/sshd -o PidFile=$PIDFILE -o ListenAddress=127.0.0.1 -o PermitRootLogin=prohibit-password \
        -o PasswordAuthentication=no
    for _ in $(seq 20); do listening && break; sleep 0.5; done
fi

# --- known hosts: both names a hostfile may use (pdsh runs ssh in batch mode: no prompt to accept a key)
for host in localhost 127.0.0.1; do
    ssh-keygen -F "$host" >/dev/null 2>&1 || ssh-keyscan -t ed25519 "$host" 2>/dev/null >> ~/.ssh/known_hosts
done

if ! "${SSH[@]}" localhost true; then
    echo "ssh_up.sh: 'ssh localhost true' still fails" >&2
    exit 1
fi
echo "ssh_up.sh: ssh to localhost works; pdsh $(pdsh -V 2>&1 | head -1)"
