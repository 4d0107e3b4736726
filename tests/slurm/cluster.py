"""A one-node SLURM cluster in a temporary directory, for integration tests.

Needs Debian's ``slurm-wlm`` and ``munge`` (``.ci/run`` installs them with apt-get) and root (the
daemons run as the current user). Everything lives under ``root``: a fresh munge key and socket,
``slurm.conf`` (``ProctrackType=proctrack/linuxproc``, ``TaskPlugin=task/none``: no cgroups),
state, spool, logs and pid files; ports are free ones picked at start. Only the daemons started
here are stopped, by the pids they wrote. Commands find the cluster through ``SLURM_CONF``
(:attr:`SlurmCluster.env`).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
SLURM_CONF = """\
ClusterName=catgradtest
SlurmctldHost={host}
SlurmUser={user}
SlurmdUser={user}
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
AuthInfo=socket={root}/munge/munge.socket
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SlurmdTimeout=60
NodeName={host} CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN
PartitionName={partition} Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


class SlurmUnavailable(RuntimeError):
    """SLURM or munge is not installed, or this user cannot run the daemons."""


def missing_programs() -> list[str]:
    """The daemons and client commands the cluster needs that are not on PATH."""
    needed = (*DAEMONS, "sbatch", "squeue", "sinfo", "scancel")
    return [name for name in needed if shutil.which(name) is None]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class SlurmCluster:
    """The running cluster: its directory, partition and the environment for its commands."""

    def __init__(self, root: Path, partition: str = "debug", cpus: int | None = None,
                 memory_mb: int = 8000) -> None:
        self.root = root
        self.partition = partition
        self.cpus = cpus or os.cpu_count() or 1
        self.memory_mb = memory_mb
        self.host = socket.gethostname().split(".")[0]
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    # --------------------------------------------------------------------------------------------
    def write_config(self) -> None:
        for folder in ("state", "spool", "munge"):
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        (self.root / "munge").chmod(0o755)
        self.conf.write_text(SLURM_CONF.format(
            host=self.host, user=os.environ.get("USER") or "root", root=self.root,
            ctld_port=free_port(), slurmd_port=free_port(), cpus=self.cpus,
            memory_mb=self.memory_mb, partition=self.partition,
        ))

    def run(self, *command: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(command, env=self.env, capture_output=True, text=True,
                              timeout=timeout, check=False)

    def start(self, timeout: float = 60) -> None:
        """Start munged, slurmctld and slurmd; wait until the node is idle."""
        self.write_config()
        munge = self.root / "munge"
        commands = [
            ["munged", "--force", f"--socket={munge}/munge.socket",
             f"--key-file={munge}/munge.key", f"--pid-file={munge}/munged.pid",
             f"--log-file={munge}/munged.log", f"--seed-file={munge}/seed"],
            ["slurmctld", "-f", str(self.conf)],
            ["slurmd", "-f", str(self.conf)],
        ]
        for command in commands:
            completed = self.run(*command)
            if completed.returncode != 0:
                raise SlurmUnavailable(
                    f"{command[0]} did not start: {(completed.stderr or completed.stdout)[-500:]}"
                )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.run("sinfo", "-h", "-o", "%t").stdout.strip()
            if state in {"idle", "mix", "alloc"}:
                return
            time.sleep(0.5)
        raise SlurmUnavailable(f"the node never became idle: {self.logs()}")

    def pids(self) -> list[int]:
        """Pids of the daemons this cluster started (from their pid files)."""
        files = [self.root / "slurmd.pid", self.root / "slurmctld.pid",
                 self.root / "munge" / "munged.pid"]
        found = []
        for path in files:
            try:
                found.append(int(path.read_text().strip()))
            except (OSError, ValueError):
                continue
        return found

    def stop(self) -> None:
        """Cancel this cluster's jobs, then stop its daemons by pid (slurmd first)."""
        if self.conf.exists():
            try:
                self.run("scancel", "--partition", self.partition, timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                pass
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and _alive(pid):
                time.sleep(0.1)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)

    def logs(self) -> str:
        """The tails of the daemons' logs (for failure messages)."""
        parts = []
        for name in ("slurmctld.log", "slurmd.log"):
            path = self.root / name
            if path.exists():
                parts.append(f"--- {name}\n" + "\n".join(path.read_text().splitlines()[-15:]))
        return "\n".join(parts)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@contextmanager
def slurm_cluster(root: Path, **options: object) -> Iterator[SlurmCluster]:
    """A started :class:`SlurmCluster`, always stopped afterwards (even when start fails)."""
    missing = missing_programs()
    if missing:
        raise SlurmUnavailable(f"not installed: {', '.join(missing)}")
    cluster = SlurmCluster(root, **options)  # type: ignore[arg-type]
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
