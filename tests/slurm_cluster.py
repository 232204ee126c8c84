"""A real one-node SLURM cluster on localhost for the `slurm` tests: install, configure, start, stop.

Debian's slurm-wlm 22.05 with munge, no systemd: munged runs as user munge, then slurmctld and slurmd from a
slurm.conf in a scratch directory (clients find it through SLURM_CONF), on free ports, with one node that
claims `cpus` CPUs whatever the machine has (`SlurmdParameters=config_overrides`). Daemons are stopped by
the PIDs they were started with; nothing in /etc/slurm is touched.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from launch.rendezvous import free_port

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
BINARIES = ("slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "scancel", "munged")
DAEMON_DIRS = ("/usr/sbin", "/usr/bin")
MUNGE_SOCKET_DIR = Path("/run/munge")


class SlurmUnavailable(RuntimeError):
    """SLURM cannot be installed or started on this machine (the reason is the message)."""


def _which(name: str) -> str | None:
    return shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), *DAEMON_DIRS]))


def install() -> None:
    """apt-get the Debian packages unless every binary is already there (needs root)."""
    if all(_which(b) for b in BINARIES):
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise SlurmUnavailable("slurm is not installed and apt-get as root is not available to install "
                               f"{' '.join(PACKAGES)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *PACKAGES]):
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            raise SlurmUnavailable(f"{' '.join(command)} failed: {result.stderr.strip()[-2000:]}")


def slurm_conf(root: Path, cpus: int, ctld_port: int, slurmd_port: int) -> str:
    """slurm.conf for one node `localhost`; every path lives under `root`."""
    return "\n".join([
        "ClusterName=hydragpt-test",
        "SlurmctldHost=localhost",
        f"SlurmctldPort={ctld_port}",
        f"SlurmdPort={slurmd_port}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"StateSaveLocation={root}/state",
        f"SlurmdSpoolDir={root}/spool",
        f"SlurmctldPidFile={root}/slurmctld.pid",
        f"SlurmdPidFile={root}/slurmd.pid",
        f"SlurmctldLogFile={root}/slurmctld.log",
        f"SlurmdLogFile={root}/slurmd.log",
        # No cgroups or systemd here: track processes by parentage, bind no CPUs.
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU",
        "SchedulerType=sched/backfill",
        "JobRequeue=1",
        "MailProg=/bin/true",
        "MpiDefault=none",
        "ReturnToService=2",
        "SlurmdParameters=config_overrides",
        "AccountingStorageType=accounting_storage/none",
        "JobAcctGatherType=jobacct_gather/none",
        # Quick turnaround for tests: a finished or killed job leaves the node at once.
        "KillWait=5",
        "MinJobAge=300",
        "InactiveLimit=0",
        f"NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=1000 State=UNKNOWN",
        "PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP",
        "",
    ])


@dataclass
class LocalSlurm:
    """munged + slurmctld + slurmd on localhost; `env` is what sbatch/srun/scontrol need."""

    root: Path
    cpus: int = 4
    pids: dict[str, int] = field(default_factory=dict)
    started_munge: bool = False
    # slurmstepd processes that were already running before this cluster started (not ours to stop).
    foreign_stepds: set[int] = field(default_factory=set)

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf),
                "PATH": os.pathsep.join([os.environ.get("PATH", ""), *DAEMON_DIRS])}

    def start(self) -> LocalSlurm:
        install()
        self.foreign_stepds = _processes_named("slurmstepd")
        for sub in ("state", "spool"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(slurm_conf(self.root, self.cpus, free_port(), free_port()))
        self._start_munge()
        self._daemon("slurmctld", [_which("slurmctld"), "-f", str(self.conf), "-i"], self.root / "slurmctld.pid")
        self._daemon("slurmd", [_which("slurmd"), "-f", str(self.conf), "-N", "localhost"],
                     self.root / "slurmd.pid")
        self._wait_until_idle()
        return self

    def _start_munge(self) -> None:
        socket_path = MUNGE_SOCKET_DIR / "munge.socket.2"
        if subprocess.run([_which("munge") or "munge", "-n"], capture_output=True).returncode == 0:
            return  # a munged is already serving the default socket
        MUNGE_SOCKET_DIR.mkdir(parents=True, exist_ok=True)
        shutil.chown(MUNGE_SOCKET_DIR, "munge", "munge")
        pid_file = MUNGE_SOCKET_DIR / "munged.pid"
        pid_file.unlink(missing_ok=True)
        socket_path.unlink(missing_ok=True)
        self._run(["runuser", "-u", "munge", "--", _which("munged"), "--force"], "munged")
        self.pids["munged"] = self._read_pid(pid_file, "munged")
        self.started_munge = True

    def _daemon(self, name: str, command: list[str], pid_file: Path) -> None:
        self._run(command, name)
        self.pids[name] = self._read_pid(pid_file, name)

    def _run(self, command: list[str], name: str) -> None:
        result = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise SlurmUnavailable(f"{name} did not start ({result.returncode}): {result.stderr.strip()}"
                                   f"{self._log_tail(name)}")

    def _read_pid(self, pid_file: Path, name: str) -> int:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if pid_file.is_file() and pid_file.read_text().strip().isdigit():
                return int(pid_file.read_text())
            time.sleep(0.1)
        raise SlurmUnavailable(f"{name} wrote no pid file {pid_file}{self._log_tail(name)}")

    def _log_tail(self, name: str) -> str:
        log = self.root / f"{name}.log"
        return f"\n{log}:\n" + "\n".join(log.read_text().splitlines()[-20:]) if log.is_file() else ""

    def _wait_until_idle(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            result = self.scontrol("show", "node", "localhost", check=False)
            state = result.stdout
            if "State=IDLE" in state:
                return
            time.sleep(0.3)
        raise SlurmUnavailable(f"node localhost not idle after {timeout:.0f} s: {state.strip()}"
                               f"{self._log_tail('slurmd')}{self._log_tail('slurmctld')}")

    def scontrol(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run([_which("scontrol"), *args], env=self.env, capture_output=True, text=True,
                                timeout=60)
        if check and result.returncode != 0:
            raise RuntimeError(f"scontrol {' '.join(args)}: {result.stderr.strip()}")
        return result

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, RestartCnt, ExitCode, ...)."""
        text = self.scontrol("show", "job", "--oneliner", job_id).stdout
        return dict(item.split("=", 1) for item in text.split() if "=" in item)

    def cancel_all_jobs(self) -> None:
        """scancel every job, and wait (up to 30 s) until no job step is left running on the node."""
        if "slurmctld" not in self.pids:
            return
        subprocess.run([_which("scancel"), "--full", "--user=root"], env=self.env, capture_output=True, timeout=60)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            queued = subprocess.run([_which("squeue"), "--noheader"], env=self.env, capture_output=True, text=True,
                                    timeout=60)
            if queued.returncode == 0 and not queued.stdout.strip():
                return
            time.sleep(0.3)

    def stop(self) -> None:
        """Cancel what is still queued, SIGTERM each daemon this object started, SIGKILL what is left after 10 s."""
        self.cancel_all_jobs()
        names = [n for n in ("slurmd", "slurmctld", "munged") if n in self.pids]
        for name in names:
            _signal(self.pids[name], signal.SIGTERM)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(self.pids[n]) for n in names):
            time.sleep(0.1)
        for name in names:
            _signal(self.pids[name], signal.SIGKILL)
        # A job step whose slurmd went away can outlive it, waiting; those of this cluster go too.
        for pid in _processes_named("slurmstepd") - self.foreign_stepds:
            _signal(pid, signal.SIGKILL)
        self.pids.clear()


def _processes_named(name: str) -> set[int]:
    """PIDs whose command name (/proc/PID/comm) is `name`."""
    pids = set()
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "comm").read_text().strip() == name:
                pids.add(int(entry.name))
        except OSError:
            continue
    return pids


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
