#!/usr/bin/env python
"""A single-node SLURM cluster with accounting, on localhost, in one folder: for the tests.

    python tools/slurm/local_cluster.py start DIR [--port-offset N]  # install if needed, start
    python tools/slurm/local_cluster.py stop DIR [--purge]           # cancel jobs, stop all
    python tools/slurm/local_cluster.py status DIR
    export SLURM_CONF=DIR/etc/slurm.conf                             # then sbatch, squeue, ...

Runs as root, without systemd: munged, MariaDB, slurmdbd, slurmctld and slurmd, each with its
key, socket, pid file, log and state under DIR, on loopback ports 6817-6819 and 3307 (plus the
offset). `start` is idempotent (it starts only what is not running) and returns once the node is
idle; `stop` leaves no process behind. Every setting below answers a measured pitfall in
../shared/docs/SLURM_NOTES.md (cited as "pitfall N").
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

PACKAGES = [
    "slurmctld",
    "slurmd",
    "slurm-client",
    "munge",
    "slurmdbd",
    "mariadb-server-core",
    "mariadb-client-core",  # not mariadb-server: it upgrades perl-base
]
CLUSTER = "airrepro"
PARTITION = "debug"
PORTS = {"slurmctld": 6817, "slurmd": 6818, "slurmdbd": 6819, "mariadb": 3307}


class ClusterError(RuntimeError):
    """The cluster could not be installed, started or stopped; the message says why."""


@dataclass
class Layout:
    """Every path of one cluster, all under `root`."""

    root: Path

    def __post_init__(self) -> None:
        self.root = self.root.resolve()
        self.etc, self.run, self.log = self.root / "etc", self.root / "run", self.root / "log"
        self.conf = self.etc / "slurm.conf"
        self.dbd_conf = self.etc / "slurmdbd.conf"  # slurmdbd reads it next to $SLURM_CONF
        self.munge_socket = self.run / "munge.socket"
        self.munge_key = self.root / "munge" / "munge.key"
        self.mysql_socket = self.run / "mysql.sock"
        self.datadir = self.root / "mysql"
        self.state, self.spool = self.root / "state", self.root / "spool"

    def pid_file(self, daemon: str) -> Path:
        return self.run / f"{daemon}.pid"

    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}


# ---------------------------------------------------------------------------------------- install
def missing_packages() -> list[str]:
    missing = []
    for pkg in PACKAGES:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}", pkg], capture_output=True, text=True
        )
        if "install ok installed" not in out.stdout:
            missing.append(pkg)
    return missing


def can_install() -> str | None:
    """None if this machine can run the cluster, else the reason it cannot (for pytest.skip)."""
    if os.geteuid() != 0:
        return "the local SLURM cluster needs root (daemons run as root, packages via apt-get)"
    if shutil.which("dpkg-query") is None or shutil.which("apt-get") is None:
        return "no apt-get/dpkg: the local SLURM cluster needs Debian packages"
    return None


def install_packages() -> None:
    """apt-get install what is missing, without letting postinst scripts start any service."""
    missing = missing_packages()
    if not missing:
        return
    reason = can_install()
    if reason:
        raise ClusterError(f"packages {missing} are missing and cannot be installed: {reason}")
    policy = Path("/usr/sbin/policy-rc.d")
    created = not policy.exists()
    if created:  # pitfall 6: exit 101 tells invoke-rc.d not to start munge/slurmd/slurmctld
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    try:
        if subprocess.run(cmd, env=env, capture_output=True, text=True).returncode != 0:
            # A fresh machine has no package lists, or stale ones; update once and retry.
            update = subprocess.run(
                ["apt-get", "update", "-q"], env=env, capture_output=True, text=True
            )
            if update.returncode != 0:
                raise ClusterError(f"apt-get update failed:\n{update.stderr[-2000:]}")
            again = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if again.returncode != 0:
                raise ClusterError(f"apt-get install {missing} failed:\n{again.stderr[-2000:]}")
    finally:
        if created:
            policy.unlink(missing_ok=True)


def short_hostname() -> str:
    return socket.gethostname().split(".")[0]


def ensure_hostname_resolves(host: str) -> None:
    """slurmd names its node by `hostname -s`; SLURM resolves it (pitfall 15)."""
    try:
        socket.gethostbyname(host)
    except OSError:
        with open("/etc/hosts", "a") as f:
            f.write(f"127.0.0.1 {host}  # added by air-repro tools/slurm/local_cluster.py\n")
        print(f"note: {host} did not resolve; added '127.0.0.1 {host}' to /etc/hosts")


# ---------------------------------------------------------------------------------------- configs
def write_configs(lay: Layout, ports: dict[str, int]) -> None:
    host = short_hostname()
    cpus = os.cpu_count() or 1
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    mem_kb = next(int(line.split()[1]) for line in meminfo if line.startswith("MemTotal"))
    real_memory = max(mem_kb // 1024 - 1024, 512)  # leave 1 GiB to the system
    sock = lay.munge_socket
    slurm_conf = f"""\
# Written by tools/slurm/local_cluster.py; see ../shared/docs/SLURM_NOTES.md for each choice.
ClusterName={CLUSTER}
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ports["slurmctld"]}
SlurmdPort={ports["slurmd"]}
AuthType=auth/munge
CredType=cred/munge
# pitfall 3: cred_expire=10 and sched_interval=2 bring a requeue down from 3 min to ~12 s
AuthInfo=socket={sock},cred_expire=10
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
StateSaveLocation={lay.state}
SlurmdSpoolDir={lay.spool}
SlurmctldPidFile={lay.pid_file("slurmctld")}
SlurmdPidFile={lay.pid_file("slurmd")}
SlurmctldLogFile={lay.log / "slurmctld.log"}
SlurmdLogFile={lay.log / "slurmd.log"}
# pitfall 7: no systemd, no delegated cgroups
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SlurmdParameters=config_overrides
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# pitfall 5: reject jobs that can never fit instead of pending forever
EnforcePartLimits=ALL
ReturnToService=2
KillWait=5
MinJobAge=300
JobRequeue=1
MpiDefault=none
MailProg=/bin/true
# pitfall 1: submitit needs sacct, so real accounting; pitfall 4: munge socket for slurmdbd
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort={ports["slurmdbd"]}
AccountingStoragePass={sock}
JobAcctGatherType=jobacct_gather/linux
JobCompType=jobcomp/filetxt
JobCompLoc={lay.log / "jobcomp.txt"}
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} Boards=1 SocketsPerBoard=1 \
CoresPerSocket={cpus} ThreadsPerCore=1 RealMemory={real_memory} State=UNKNOWN
PartitionName={PARTITION} Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""
    dbd_conf = f"""\
# Written by tools/slurm/local_cluster.py (pitfall 14: mode 600, found next to $SLURM_CONF).
AuthType=auth/munge
AuthInfo=socket={sock}
DbdAddr=127.0.0.1
DbdHost=localhost
DbdPort={ports["slurmdbd"]}
SlurmUser=root
PidFile={lay.pid_file("slurmdbd")}
LogFile={lay.log / "slurmdbd.log"}
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={ports["mariadb"]}
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
"""
    lay.etc.mkdir(parents=True, exist_ok=True)
    lay.conf.write_text(slurm_conf)
    lay.dbd_conf.write_text(dbd_conf)
    lay.dbd_conf.chmod(0o600)


def read_ports(lay: Layout) -> dict[str, int]:
    """Ports of an existing cluster folder (from its config), so restarts keep them."""
    ports = dict(PORTS)
    keys = {
        "SlurmctldPort": "slurmctld",
        "SlurmdPort": "slurmd",
        "AccountingStoragePort": "slurmdbd",
    }
    for line in lay.conf.read_text().splitlines():
        key, _, value = line.partition("=")
        if key in keys:
            ports[keys[key]] = int(value)
    for line in lay.dbd_conf.read_text().splitlines():
        if line.startswith("StoragePort="):
            ports["mariadb"] = int(line.split("=", 1)[1])
    return ports


# ---------------------------------------------------------------------------------------- processes
def _pid_state(pid: int) -> str | None:
    """The process's state letter from /proc (Z: zombie), or None if there is none."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def alive(pid: int | None) -> bool:
    # pitfall 12: PID 1 reaps orphans late; a zombie holds no port and counts as stopped
    return pid is not None and _pid_state(pid) not in (None, "Z")


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (FileNotFoundError, ValueError, IndexError):
        return None


def daemon_pid(lay: Layout, daemon: str) -> int | None:
    """PID of a running daemon of this cluster, or None."""
    pid = read_pid(lay.pid_file(daemon))
    return pid if alive(pid) else None


def _wait(check, timeout: float, what: str, log: Path | None = None) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    tail = ""
    if log is not None and log.exists():
        tail = (
            "\n--- "
            + str(log)
            + " (last lines) ---\n"
            + "\n".join(log.read_text(errors="replace").splitlines()[-20:])
        )
    raise ClusterError(f"timed out after {timeout:.0f} s waiting for {what}{tail}")


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _run(cmd: list[str], lay: Layout, check: bool = True, timeout: float = 60):
    out = subprocess.run(cmd, env=lay.env(), capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise ClusterError(f"{' '.join(cmd)} failed ({out.returncode}): {out.stderr.strip()}")
    return out


def _kill(pid: int, timeout: float, name: str) -> None:
    """SIGTERM, then SIGKILL if it is still there after `timeout` seconds."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and alive(pid):
            time.sleep(0.05)
        if not alive(pid):
            return
    raise ClusterError(f"{name} (pid {pid}) survived SIGKILL")


# ---------------------------------------------------------------------------------------- start
def start(root: Path, port_offset: int = 0) -> Layout:
    """Install if needed, then start whatever of the cluster is not running; wait until idle."""
    lay = Layout(root)
    install_packages()
    host = short_hostname()
    ensure_hostname_resolves(host)
    for d in (lay.run, lay.log, lay.munge_key.parent, lay.state, lay.spool):
        d.mkdir(parents=True, exist_ok=True)
    if lay.conf.exists() and lay.dbd_conf.exists():
        ports = read_ports(lay)
    else:
        ports = {k: v + port_offset for k, v in PORTS.items()}
    write_configs(lay, ports)
    _start_munged(lay)
    _start_mariadb(lay, ports["mariadb"])
    _start_slurm_daemons(lay, ports, host)
    return lay


def _start_munged(lay: Layout) -> None:
    if daemon_pid(lay, "munged"):
        return
    if not lay.munge_key.exists():
        subprocess.run(["mungekey", "--create", f"--keyfile={lay.munge_key}"], check=True)
    lay.munge_key.chmod(0o600)
    lay.munge_socket.unlink(missing_ok=True)
    # pitfall 4: our own munged and socket, never the system one
    subprocess.run(
        [
            "munged",
            f"--socket={lay.munge_socket}",
            f"--key-file={lay.munge_key}",
            f"--pid-file={lay.pid_file('munged')}",
            f"--log-file={lay.log / 'munged.log'}",
            f"--seed-file={lay.munge_key.parent / 'munged.seed'}",
            "--force",
        ],
        check=True,
        capture_output=True,
    )
    _wait(
        lambda: daemon_pid(lay, "munged") and lay.munge_socket.exists(),
        10,
        "munged",
        lay.log / "munged.log",
    )


def _mysql(lay: Layout, sql: str) -> None:
    subprocess.run(
        ["mariadb", "--no-defaults", f"--socket={lay.mysql_socket}", "-uroot", "-e", sql],
        check=True,
        capture_output=True,
        timeout=30,
    )


def _start_mariadb(lay: Layout, port: int) -> None:
    if daemon_pid(lay, "mariadb"):
        return
    fresh = not (lay.datadir / "mysql").is_dir()
    if fresh:  # pitfall 14: its own datadir; root logs in through the socket
        subprocess.run(
            [
                "mariadb-install-db",
                "--no-defaults",
                f"--datadir={lay.datadir}",
                "--user=root",
                "--auth-root-authentication-method=socket",
                "--skip-test-db",
            ],
            check=True,
            capture_output=True,
        )
    log = lay.log / "mariadb.log"
    with open(log, "ab") as out:
        subprocess.Popen(
            [
                "mariadbd",
                "--no-defaults",
                f"--datadir={lay.datadir}",
                "--user=root",
                f"--socket={lay.mysql_socket}",
                f"--port={port}",
                "--bind-address=127.0.0.1",
                f"--pid-file={lay.pid_file('mariadb')}",
                f"--log-error={log}",
                "--skip-name-resolve",
                "--innodb-buffer-pool-size=64M",
            ],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
    _wait(lambda: daemon_pid(lay, "mariadb") and _port_open(port), 60, "MariaDB", log)
    # Both spellings: slurmdbd connects over TCP to 127.0.0.1 and names are not resolved.
    _mysql(
        lay,
        "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';"
        "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';"
        "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
        "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';",
    )


def _node_state(lay: Layout, host: str) -> str:
    out = _run(["sinfo", "--noheader", "-n", host, "-o", "%T"], lay, check=False, timeout=10)
    return out.stdout.strip()


def _start_slurm_daemons(lay: Layout, ports: dict[str, int], host: str) -> None:
    if not daemon_pid(lay, "slurmdbd"):
        _run(["slurmdbd"], lay)  # daemonizes; reads slurmdbd.conf beside $SLURM_CONF
        _wait(
            lambda: daemon_pid(lay, "slurmdbd") and _port_open(ports["slurmdbd"]),
            60,
            "slurmdbd",
            lay.log / "slurmdbd.log",
        )
    clusters = _run(
        ["sacctmgr", "--noheader", "--parsable2", "list", "cluster", "format=cluster"], lay
    ).stdout.split()
    if CLUSTER not in clusters:
        _run(["sacctmgr", "-i", "add", "cluster", CLUSTER], lay)
    if not daemon_pid(lay, "slurmctld"):
        _run(["slurmctld"], lay)
        _wait(
            lambda: "UP" in _run(["scontrol", "ping"], lay, check=False, timeout=10).stdout,
            30,
            "slurmctld",
            lay.log / "slurmctld.log",
        )
    if not daemon_pid(lay, "slurmd"):
        _run(["slurmd", "-N", host], lay)
    _wait(
        lambda: _node_state(lay, host) in ("idle", "mixed", "allocated"),
        60,
        f"node {host} to become idle",
        lay.log / "slurmd.log",
    )


# ---------------------------------------------------------------------------------------- stop
def _children(pids: set[int]) -> set[int]:
    """`pids` and all their descendants (from /proc)."""
    parent: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parent[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found = set(pids)
    grew = True
    while grew:
        new = {p for p, pp in parent.items() if pp in found and p not in found}
        found |= new
        grew = bool(new)
    return found


def _step_daemons(lay: Layout) -> set[int]:
    """slurmstepd processes of this cluster: the owners of the sockets in its spool (pitfall 8)."""
    inodes = set()
    try:
        for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
            parts = line.split()
            if len(parts) >= 8 and parts[7].startswith(str(lay.spool)):
                inodes.add(parts[6])
    except OSError:
        return set()
    owners = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            for fd in (entry / "fd").iterdir():
                link = os.readlink(fd)
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    owners.add(int(entry.name))
                    break
        except OSError:
            continue
    return owners


def stop(root: Path, purge: bool = False) -> None:
    """Cancel every job, kill job processes and daemons of this cluster; optionally delete it."""
    lay = Layout(root)
    if not lay.root.exists():
        return
    if daemon_pid(lay, "slurmctld"):
        jobs = _run(["squeue", "--noheader", "-o", "%A"], lay, check=False, timeout=10).stdout
        if jobs.split():
            _run(["scancel", *sorted(set(jobs.split()))], lay, check=False, timeout=10)
    job_pids: set[int] = set()
    if daemon_pid(lay, "slurmd"):
        listed = _run(["scontrol", "listpids"], lay, check=False, timeout=10).stdout
        job_pids |= {int(line.split()[0]) for line in listed.splitlines()[1:] if line.strip()}
    job_pids |= _children(_step_daemons(lay))  # steps and whatever they started
    for pid in sorted(job_pids):
        if pid != os.getpid() and alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)  # slurmstepd ignores SIGTERM (pitfall 8)
    for daemon, grace in (
        ("slurmd", 10),
        ("slurmctld", 10),
        ("slurmdbd", 10),
        ("mariadb", 30),
        ("munged", 10),
    ):
        pid = daemon_pid(lay, daemon)
        if pid:
            _kill(pid, grace, daemon)
    for sock in lay.spool.glob("*"):
        if sock.is_socket():
            sock.unlink(missing_ok=True)  # stale step sockets would confuse a restart
    left = [
        f"{d} ({daemon_pid(lay, d)})"
        for d in ("slurmd", "slurmctld", "slurmdbd", "mariadb", "munged")
        if daemon_pid(lay, d)
    ]
    left += [f"job process {p}" for p in job_pids if alive(p)]
    if left:
        raise ClusterError(f"still running after stop: {', '.join(left)}")
    if purge:
        shutil.rmtree(lay.root, ignore_errors=True)


def status(root: Path) -> dict[str, int | None]:
    lay = Layout(root)
    return {d: daemon_pid(lay, d) for d in ("munged", "mariadb", "slurmdbd", "slurmctld", "slurmd")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("command", choices=["start", "stop", "status"])
    p.add_argument("dir", type=Path, help="folder holding the cluster's config, state and logs")
    p.add_argument(
        "--port-offset",
        type=int,
        default=0,
        help="added to ports 6817-6819 and 3307 (a second cluster beside the first)",
    )
    p.add_argument("--purge", action="store_true", help="stop: also delete DIR")
    args = p.parse_args(argv)
    try:
        if args.command == "start":
            t0 = time.monotonic()
            lay = start(args.dir, args.port_offset)
            print(
                f"cluster up in {time.monotonic() - t0:.1f} s; use it with:\n"
                f"export SLURM_CONF={lay.conf}"
            )
        elif args.command == "stop":
            stop(args.dir, args.purge)
        else:
            for daemon, pid in status(args.dir).items():
                print(f"{daemon:10s} {'running, pid ' + str(pid) if pid else 'stopped'}")
    except ClusterError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
