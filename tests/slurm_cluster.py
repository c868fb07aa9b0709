"""A single-node SLURM cluster on this machine, from Debian's packages (``slurm-wlm``, ``munge``), for the tests.

Everything lives in one temp folder and nothing outside it changes: a fresh munge key and ``munged`` on its own socket,
a generated ``slurm.conf`` (``ProctrackType=proctrack/linuxproc``, ``TaskPlugin=task/none``: no cgroups, no systemd),
``slurmctld -D`` and ``slurmd -D`` on free ports, all three started here as background processes, and stopped here by
their pids (also when the start fails). Clients (``sbatch``, ``squeue``, ...) find the cluster through ``SLURM_CONF``,
which :attr:`SlurmCluster.env` sets and jobs inherit.

The node is this machine as ``slurmd -C`` describes it (CPUs, memory) with two GPUs as GRES: count-only GPUs are
dropped by Slurm 22.05, so their device files are ``/dev/null`` and ``/dev/zero``. Jobs asking ``--gres=gpu:1`` are
then scheduled two at a time with ``CUDA_VISIBLE_DEVICES`` set, as on a GPU node; what they train on is up to them
(the tests pass ``--device cpu``). Jobs run as the user who submits them; run as root (slurmd starts job steps as
their owner).
"""

from __future__ import annotations

import contextlib
import getpass
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from services import free_port, tail

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sinfo")
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
            "DEADLINE"}
INSTALL_HINT = "apt-get install -y slurm-wlm munge"
GPU_FILES = ("/dev/null", "/dev/zero")  # the node's two "GPUs" (see the module docstring)


class SlurmError(RuntimeError):
    """The cluster could not be started or did not answer; the message says which part and shows its log."""


@dataclass(frozen=True)
class Job:
    """One job (or one array task) as ``scontrol show job`` reports it."""

    fields: dict[str, str]

    @property
    def id(self) -> str:
        return self.fields["JobId"]

    @property
    def state(self) -> str:
        return self.fields["JobState"]

    @property
    def task(self) -> str | None:
        return self.fields.get("ArrayTaskId")

    @property
    def done(self) -> bool:
        return self.state in TERMINAL

    def __str__(self) -> str:
        keys = ("JobId", "ArrayJobId", "ArrayTaskId", "JobState", "Reason", "ExitCode", "StartTime", "EndTime")
        return " ".join(f"{k}={self.fields[k]}" for k in keys if k in self.fields)



class SlurmCluster:
    """munged + slurmctld + slurmd under ``root``; :meth:`start`, submit with :meth:`sbatch`, :meth:`stop`."""

    def __init__(self, root: Path | None = None, kill_wait: int = 10) -> None:
        # Not pytest's tmp_path: munged wants its socket folder (and the folders above it) open to every user.
        self.root = Path(root) if root else Path(tempfile.mkdtemp(prefix="allconv-slurm-"))
        self.kill_wait = kill_wait
        self.conf = self.root / "slurm.conf"
        self.socket = self.root / "run" / "munge.socket"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.startup_seconds: float | None = None
        self.node = ""

    @property
    def env(self) -> dict[str, str]:
        """This environment with the cluster's config: for the clients, and inherited by the jobs."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    # ------------------------------------------------------------------------------------------------------------
    # start and stop

    def start(self, timeout: float = 60.0) -> SlurmCluster:
        """Write the config, start the three daemons and wait for the node to be idle; stops what it started if that
        fails. Records :attr:`startup_seconds` (daemons started to node idle)."""
        missing = [b for b in BINARIES if shutil.which(b) is None]
        if missing:
            raise SlurmError(f"SLURM/munge programs not found ({', '.join(missing)}): {INSTALL_HINT}")
        started = time.monotonic()
        try:
            self._write_config()
            self._start_munged(timeout)
            self._spawn("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
            self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf)])
            self._wait_idle(started + timeout)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - started
        return self

    def _node_line(self) -> str:
        """This machine's node definition from ``slurmd -C`` (its first line: name, CPUs, sockets, memory)."""
        out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, timeout=30)
        line = out.stdout.splitlines()[0] if out.stdout.strip() else ""
        match = re.match(r"NodeName=(\S+)", line)
        if out.returncode or not match:
            raise SlurmError(f"slurmd -C did not describe this machine: {out.stderr.strip() or out.stdout.strip()}")
        self.node = match.group(1)
        return line

    def _write_config(self) -> None:
        for sub in ("munge", "run", "state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)
        (self.root / "munge").chmod(0o700)
        (self.root / "run").chmod(0o755)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        user = getpass.getuser()
        node = self._node_line()
        (self.root / "plugstack.conf").write_text("")
        (self.root / "gres.conf").write_text(
            "AutoDetect=off\n"
            f"NodeName={self.node} Name=gpu File={','.join(GPU_FILES)}\n")
        r = self.root
        self.conf.write_text(f"""\
# generated by tests/slurm_cluster.py: one node, this machine
ClusterName=allconvtest
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.socket}
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/run/slurmctld.pid
SlurmdPidFile={r}/run/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
PlugStackConfig={r}/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
KillWait={self.kill_wait}
GresTypes=gpu
{node} NodeAddr=127.0.0.1 Gres=gpu:{len(GPU_FILES)} State=UNKNOWN
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")

    def _spawn(self, name: str, cmd: list[str]) -> None:
        with open(self.root / "log" / f"{name}.out", "ab") as log:
            self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                                cwd=self.root, start_new_session=True)

    def _start_munged(self, timeout: float) -> None:
        m = self.root / "munge"
        self._spawn("munged", ["munged", "--foreground", f"--key-file={m / 'munge.key'}", f"--socket={self.socket}",
                               f"--pid-file={self.root / 'run' / 'munged.pid'}", f"--seed-file={m / 'munged.seed'}",
                               f"--log-file={self.root / 'log' / 'munged.log'}"])
        deadline = time.monotonic() + timeout
        while not self.socket.exists():
            self._check_alive()
            if time.monotonic() > deadline:
                raise SlurmError(f"munged made no socket in {timeout:.0f}s:\n{self.logs()}")
            time.sleep(0.05)

    def _check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise SlurmError(f"{name} exited with {proc.returncode}:\n{self.logs()}")

    def _wait_idle(self, deadline: float) -> None:
        state = ""
        while state != "idle":
            self._check_alive()
            if time.monotonic() > deadline:
                raise SlurmError(f"node {self.node} not idle (state {state or 'unknown'}):\n{self.logs()}")
            out = self._run(["sinfo", "-h", "-n", self.node, "-o", "%T"], check=False)
            state = out.stdout.strip()
            if state != "idle":
                time.sleep(0.1)

    def stop(self) -> None:
        """Cancel every job, wait for them to end, then stop slurmd, slurmctld and munged, each by its pid (SIGTERM,
        SIGKILL after 15 s). Safe to call twice, and after a failed start."""
        if self.procs.get("slurmctld") is not None and self.procs["slurmctld"].poll() is None:
            with contextlib.suppress(Exception):
                self.cancel_all()
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)

    def cancel_all(self) -> None:
        """Cancel every job of this (private) cluster and wait until they have ended, KillWait included."""
        self._run(["scancel", "--user", getpass.getuser()], check=False)
        deadline = time.monotonic() + self.kill_wait + 20
        while self.queue() and time.monotonic() < deadline:
            time.sleep(0.5)

    def leftovers(self) -> list[int]:
        """Pids of processes still running with this cluster's ``SLURM_CONF`` (daemons, job steps, jobs): none
        should remain after :meth:`stop`."""
        marker = f"SLURM_CONF={self.conf}".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                with contextlib.suppress(OSError):
                    if marker in (entry / "environ").read_bytes().split(b"\0"):
                        found.append(int(entry.name))
        return found

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def logs(self) -> str:
        parts = []
        for path in sorted((self.root / "log").glob("*")):
            parts.append(f"==== {path.name}\n{tail(path)}")
        return "\n".join(parts)

    # ------------------------------------------------------------------------------------------------------------
    # the clients

    def _run(self, cmd: list[str], check: bool = True, **kwargs: object) -> subprocess.CompletedProcess[str]:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60,
                             **{"env": self.env, **kwargs})  # type: ignore[call-overload]
        if check and out.returncode:
            raise SlurmError(f"{' '.join(cmd)} exited with {out.returncode}: {out.stderr.strip()}")
        return out

    def sbatch(self, script: Path, *script_args: str, options: tuple[str, ...] = (), env: dict[str, str] | None = None,
               cwd: Path | None = None) -> str:
        """Submit ``script`` (its ``#SBATCH`` lines; ``options`` on the command line win) and return the job id."""
        cmd = ["sbatch", "--parsable", *options, str(script), *script_args]
        out = self._run(cmd, env={**(env or os.environ), "SLURM_CONF": str(self.conf)}, cwd=cwd)
        return out.stdout.strip().split(";")[0]

    def jobs(self, job_id: str) -> list[Job]:
        """The job, or every task of an array job (pending ones as one record), while slurmctld remembers them."""
        out = self._run(["scontrol", "-o", "show", "job", job_id])
        return [Job(dict(re.findall(r"(\w+)=(\S*)", line))) for line in out.stdout.splitlines() if line.strip()]

    def queue(self) -> list[str]:
        """Ids of the jobs not yet ended."""
        return self._run(["squeue", "-h", "-o", "%i"], check=False).stdout.split()

    def wait(self, job_id: str, timeout: float, tasks: int = 1) -> list[Job]:
        """Wait until ``tasks`` jobs of ``job_id`` (array tasks) have all ended; returns them."""
        deadline = time.monotonic() + timeout
        while True:
            jobs = self.jobs(job_id)
            ended = [j for j in jobs if j.done]
            if len(ended) == len(jobs) >= tasks:
                return sorted(jobs, key=lambda j: int(j.task or 0))
            if time.monotonic() > deadline:
                raise SlurmError(f"job {job_id} not done after {timeout:.0f}s:\n" + "\n".join(map(str, jobs)))
            time.sleep(0.5)

    def scancel(self, job_id: str) -> None:
        """Cancel a job; an array task is ``ARRAYID_TASK`` (Slurm 22.05 refuses a task's own job id). scancel exits 0
        even when it refuses, so its error line counts too."""
        out = self._run(["scancel", job_id])
        if "error" in out.stderr:
            raise SlurmError(f"scancel {job_id}: {out.stderr.strip()}")

    @staticmethod
    def job_of(pid: int) -> dict[str, str]:
        """The ``SLURM_*`` variables of a running process: which job and array task it belongs to."""
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        pairs = (item.decode(errors="replace").split("=", 1) for item in env if item.startswith(b"SLURM_"))
        return {k: v for k, v in pairs}

