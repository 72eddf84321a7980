"""A real two-node SLURM cluster on one machine, for the launcher tests.

One controller and two compute nodes (``n1``, ``n2``), each in a network namespace of its own,
joined by a bridge in the controller's namespace; munge and slurm-wlm from Debian's packages.
The recipe (addresses, route_localnet, the per-node ``/etc/hosts``) is the one measured in
``/work/shared/notes/slurm-test-cluster.md``.

Everything a cluster creates is named after a random tag: namespaces ``bxs-<tag>-{ctl,n1,n2}``,
files under ``/tmp/bigtx-slurm/<tag>/``. ``owner.pid`` there names the process that owns it, so
``clean_leftovers()`` can remove the remains of a crashed run (its daemons are killed by the pids
found in its namespaces and pid files) without touching a cluster another process still uses.

Daemons run in the foreground (``-D``/``-F``) as direct children of this process, so their pids
are known without pid files; tear-down kills them by pid, then every process still left in the
cluster's namespaces (job steps, tasks), then deletes the namespaces.
"""

from __future__ import annotations

import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

BASE = Path("/tmp/bigtx-slurm")
NETNS_PREFIX = "bxs-"
NODES = ("n1", "n2")
PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge", "iproute2")
BINARIES = ("slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sinfo", "munged", "ip", "nsenter")

SLURM_CONF = """\
ClusterName=bigtxtest
SlurmctldHost=localhost({ctl_addr})
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket},cred_expire=5
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool/%n
SlurmctldPidFile={dir}/run/slurmctld.pid
SlurmdPidFile={dir}/run/slurmd.%n.pid
SlurmctldLogFile={dir}/log/slurmctld.log
SlurmdLogFile={dir}/log/slurmd.%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
PlugStackConfig={dir}/etc/plugstack.conf
# Fast reactions for tests: a dead node is noticed after SlurmdTimeout, tasks get KillWait
# seconds between SIGTERM and SIGKILL, and finished jobs stay visible to scontrol for MinJobAge.
SlurmdTimeout=20
KillWait=10
MinJobAge=600
SchedulerParameters=sched_interval=2
{nodes}
PartitionName=debug Nodes={node_names} Default=YES MaxTime=INFINITE State=UP
"""

# States a job does not leave by itself.
FINAL_STATES = frozenset(
    {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL", "DEADLINE"}
)


class ClusterError(RuntimeError):
    pass


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None]


def install_packages() -> str | None:
    """Install the Debian packages if a binary is missing; return why it could not, or None."""
    if not missing_binaries():
        return None
    if os.geteuid() != 0:
        return f"not root, and {', '.join(missing_binaries())} missing (apt-get install {' '.join(PACKAGES)})"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *PACKAGES]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            return f"`{' '.join(cmd)}` failed: {proc.stderr.strip()[-500:]}"
    missing = missing_binaries()
    return f"still missing after apt-get install: {', '.join(missing)}" if missing else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _netns_list() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _netns_pids(name: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _kill_and_wait(pids: Iterable[int], timeout: float = 10.0) -> None:
    """SIGTERM each pid, wait for all to go, SIGKILL whatever is left after ``timeout``."""
    pids = [p for p in pids if p > 1 and p != os.getpid()]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pids = [p for p in pids if _pid_alive(p) and not _reap(p)]
            if not pids:
                return
            time.sleep(0.1)


def _reap(pid: int) -> bool:
    """Collect ``pid`` if it is an exited child of ours; True when it is gone."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return False  # not our child: _pid_alive decides
    return done == pid


def _cmdline_mentions(pid: int, text: str) -> bool:
    try:
        return text in Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False


def _destroy(tag: str) -> None:
    """Kill every process of cluster ``tag`` (namespaces + recorded pids) and delete its namespaces."""
    names = [n for n in _netns_list() if n.startswith(f"{NETNS_PREFIX}{tag}-")]
    pids: set[int] = set()
    for name in names:
        pids.update(_netns_pids(name))
    pidfile = BASE / tag / "daemons.pid"
    if pidfile.exists():
        # a recorded pid may have been reused since: only kill it if it still names this cluster
        pids.update(int(p) for p in pidfile.read_text().split() if _cmdline_mentions(int(p), str(BASE / tag)))
    _kill_and_wait(sorted(pids))
    for name in names:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
    shutil.rmtree(BASE / tag, ignore_errors=True)


def clean_leftovers() -> list[str]:
    """Destroy clusters whose owning process is gone (a crashed or killed test run)."""
    tags = {n[len(NETNS_PREFIX) :].rsplit("-", 1)[0] for n in _netns_list() if n.startswith(NETNS_PREFIX)}
    if BASE.is_dir():
        tags.update(p.name for p in BASE.iterdir() if p.is_dir())
    cleaned = []
    for tag in sorted(tags):
        owner = BASE / tag / "owner.pid"
        try:
            alive = _pid_alive(int(owner.read_text()))
        except (OSError, ValueError):
            alive = False
        if not alive:
            _destroy(tag)
            cleaned.append(tag)
    return cleaned


class SlurmCluster:
    """munge + slurmctld + one slurmd per node, each node in its own network namespace.

    Client commands run in the controller's namespace with ``SLURM_CONF`` set. Files for jobs
    can live anywhere on the (shared) file system.
    """

    def __init__(self, nodes: tuple[str, ...] = NODES, cpus_per_node: int = 2) -> None:
        self.tag = secrets.token_hex(3)
        self.dir = BASE / self.tag
        self.nodes = nodes
        self.cpus_per_node = cpus_per_node
        # a /24 of its own inside 127.100.0.0/16, so leftovers of another run never collide
        self.subnet = f"127.100.{int(self.tag, 16) % 254 + 1}"
        self.ctl_addr = f"{self.subnet}.1"
        self.node_addr = {n: f"{self.subnet}.{11 + i}" for i, n in enumerate(nodes)}
        self.ctl_ns = f"{NETNS_PREFIX}{self.tag}-ctl"
        self.node_ns = {n: f"{NETNS_PREFIX}{self.tag}-{n}" for n in nodes}
        self.conf = self.dir / "etc" / "slurm.conf"
        self.munge_dir = self.dir / "munge"
        self.munge_socket = self.munge_dir / "munge.socket"
        self.hosts_file = self.dir / "etc" / "hosts"
        self.procs: dict[str, subprocess.Popen] = {}

    # ---- bring-up -----------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> SlurmCluster:
        try:
            self._make_dirs()
            self._make_network()
            self._start_munge()
            self._write_conf()
            self._start_slurmctld()
            for node in self.nodes:
                self.start_slurmd(node)
            self._wait_idle(len(self.nodes), timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _make_dirs(self) -> None:
        for sub in ("etc", "state", "run", "log", *(f"spool/{n}" for n in self.nodes)):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        BASE.chmod(0o755)
        self.dir.chmod(0o755)
        (self.dir / "owner.pid").write_text(str(os.getpid()))
        (self.dir / "etc" / "plugstack.conf").write_text("")
        hosts = ["127.0.0.1 localhost", f"{self.ctl_addr} ctl"]
        hosts += [f"{addr} {node}" for node, addr in self.node_addr.items()]
        self.hosts_file.write_text("\n".join(hosts) + "\n")

    def _ip(self, *args: str, ns: str | None = None) -> None:
        cmd = ["ip", *(["-n", ns] if ns else []), *args]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise ClusterError(f"{' '.join(cmd)}: {proc.stderr.strip()}")

    def _localnet(self, ns: str, *devs: str) -> None:
        """127/8 addresses off lo: lo keeps only 127.0.0.1/32 and the devices route 127/8."""
        self._ip("link", "set", "lo", "up", ns=ns)  # gives lo 127.0.0.1/8
        self._ip("addr", "del", "127.0.0.1/8", "dev", "lo", ns=ns)
        self._ip("addr", "add", "127.0.0.1/32", "dev", "lo", ns=ns)
        for dev in ("all", *devs):
            subprocess.run(
                ["ip", "netns", "exec", ns, "sysctl", "-qw", f"net.ipv4.conf.{dev}.route_localnet=1"],
                check=True,
                capture_output=True,
            )

    def _make_network(self) -> None:
        for ns in (self.ctl_ns, *self.node_ns.values()):
            self._ip("netns", "add", ns)
        self._ip("link", "add", "br0", "type", "bridge", ns=self.ctl_ns)
        self._ip("addr", "add", f"{self.ctl_addr}/24", "dev", "br0", ns=self.ctl_ns)
        self._ip("link", "set", "br0", "up", ns=self.ctl_ns)
        self._localnet(self.ctl_ns, "br0")
        for node, ns in self.node_ns.items():
            # the pair is created inside the namespaces, so nothing is named in the root one
            peer = f"v{node}"
            self._ip("link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", peer, "netns", self.ctl_ns)
            self._ip("link", "set", peer, "master", "br0", ns=self.ctl_ns)
            self._ip("link", "set", peer, "up", ns=self.ctl_ns)
            self._ip("addr", "add", f"{self.node_addr[node]}/24", "dev", "eth0", ns=ns)
            self._ip("link", "set", "eth0", "up", ns=ns)
            self._localnet(ns, "eth0")

    def _spawn(self, name: str, cmd: list[str], **kwargs) -> subprocess.Popen:
        log = open(self.dir / "log" / f"{name}.stdio", "ab")  # noqa: SIM115 - owned by the child
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **kwargs)
        log.close()
        self.procs[name] = proc
        with open(self.dir / "daemons.pid", "a") as f:
            f.write(f"{proc.pid}\n")
        return proc

    def _start_munge(self) -> None:
        munge = pwd.getpwnam("munge")
        self.munge_dir.mkdir(exist_ok=True)
        key = self.munge_dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        for path in (self.munge_dir, key):
            os.chown(path, munge.pw_uid, munge.pw_gid)
        key.chmod(0o400)
        self.munge_dir.chmod(0o711)  # munged refuses a socket dir others can write to
        d = self.munge_dir
        self._spawn(
            "munged",
            [
                "munged",
                "--foreground",
                f"--socket={self.munge_socket}",
                f"--key-file={key}",
                f"--log-file={d / 'munged.log'}",
                f"--pid-file={d / 'munged.pid'}",
                f"--seed-file={d / 'munged.seed'}",
            ],
            user=munge.pw_uid,
            group=munge.pw_gid,
            extra_groups=[],
        )
        self._poll(lambda: self.munge_socket.exists(), 10, "munged did not create its socket")

    def _write_conf(self) -> None:
        nodes = "\n".join(
            f"NodeName={n} NodeAddr={a} CPUs={self.cpus_per_node} RealMemory=1000 State=UNKNOWN"
            for n, a in self.node_addr.items()
        )
        self.conf.write_text(
            SLURM_CONF.format(
                ctl_addr=self.ctl_addr,
                munge_socket=self.munge_socket,
                dir=self.dir,
                nodes=nodes,
                node_names=",".join(self.nodes),
            )
        )

    def _start_slurmctld(self) -> None:
        self._spawn(
            "slurmctld", ["nsenter", f"--net=/run/netns/{self.ctl_ns}", "slurmctld", "-D", "-i", "-f", str(self.conf)]
        )

    def start_slurmd(self, node: str) -> None:
        """Start (or restart) the slurmd of ``node`` with its own host name and /etc/hosts."""
        inner = f"mount --bind {self.hosts_file} /etc/hosts && hostname {node} && exec slurmd -D -f {self.conf}"
        self._spawn(
            f"slurmd.{node}",
            ["nsenter", f"--net=/run/netns/{self.node_ns[node]}", "unshare", "--uts", "--mount", "sh", "-c", inner],
            env=self.env(),
        )

    def _wait_idle(self, count: int, timeout: float) -> None:
        def idle() -> bool:
            out = self.run_in_ctl(["sinfo", "-h", "-t", "idle", "-o", "%D"], check=False).stdout.strip()
            return out == str(count)

        self._poll(idle, timeout, f"{count} nodes did not become idle; see {self.dir}/log")

    def _poll(self, cond, timeout: float, message: str, interval: float = 0.2) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cond():
                return
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise ClusterError(f"{name} exited with {proc.returncode}; see {self.dir}/log")
            time.sleep(interval)
        raise ClusterError(message)

    # ---- tear-down ----------------------------------------------------------------------

    def stop(self) -> None:
        """Cancel jobs, kill the daemons and every process left in the namespaces, delete them."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.run_in_ctl(["scancel", "--full", "--user=root"], check=False, timeout=10)
        # munged last: the others talk to it until they are gone
        for name in sorted(self.procs, key=lambda n: n == "munged"):
            if self.procs[name].poll() is None:
                _kill_and_wait([self.procs[name].pid])
        _destroy(self.tag)  # stray job steps and tasks in the namespaces, then the namespaces

    def kill_slurmd(self, node: str) -> None:
        proc = self.procs.pop(f"slurmd.{node}")
        _kill_and_wait([proc.pid])

    # ---- clients ------------------------------------------------------------------------

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf), **(extra or {})}

    def run_in_ctl(
        self, cmd: list[str] | str, *, env: Mapping[str, str] | None = None, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess:
        """Run a command (list, or a string for ``sh -c``) in the controller's namespace."""
        argv = ["sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        proc = subprocess.run(
            ["nsenter", f"--net=/run/netns/{self.ctl_ns}", *argv],
            env=self.env(env),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise ClusterError(f"{argv} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def sbatch(self, path: str | os.PathLike, env: Mapping[str, str] | None = None, args: Iterable[str] = ()) -> int:
        """Submit a batch script; return the job id."""
        out = self.run_in_ctl(["sbatch", "--parsable", *args, str(path)], env=env).stdout
        return int(out.strip().split(";")[0])

    def squeue(self) -> list[dict[str, str]]:
        """Jobs the controller still queues or runs: id, state, name, nodes, reason."""
        out = self.run_in_ctl(["squeue", "-h", "-o", "%i|%T|%j|%N|%r"]).stdout
        keys = ("id", "state", "name", "nodes", "reason")
        return [dict(zip(keys, line.split("|"), strict=True)) for line in out.splitlines() if line]

    def scancel(self, *args: str) -> None:
        self.run_in_ctl(["scancel", *args])

    def job_info(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, ExitCode, Restarts, NodeList, ...)."""
        out = self.run_in_ctl(["scontrol", "-o", "show", "job", str(job_id)]).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def job_state(self, job_id: int) -> str:
        return self.job_info(job_id)["JobState"]

    def wait_for(self, job_id: int, states: Iterable[str], timeout: float, interval: float = 0.5) -> str:
        """Poll until the job is in one of ``states``; raise (with the state seen) on timeout or
        when it reaches a final state that was not asked for."""
        wanted = set(states)
        deadline = time.monotonic() + timeout
        state = "?"
        while time.monotonic() < deadline:
            state = self.job_state(job_id)
            if state in wanted:
                return state
            if state in FINAL_STATES:
                raise ClusterError(f"job {job_id} ended {state}, waited for {sorted(wanted)}: {self.job_info(job_id)}")
            time.sleep(interval)
        raise ClusterError(f"job {job_id} still {state} after {timeout}s, waited for {sorted(wanted)}")

    def node_pids(self, node: str) -> list[int]:
        """Every process in ``node``'s network namespace (slurmd, job steps, tasks)."""
        return _netns_pids(self.node_ns[node])

    def job_pids(self, node: str) -> list[int]:
        """The processes of running jobs on ``node``: its slurmstepd's and their tasks (not slurmd)."""
        daemon = self.procs.get(f"slurmd.{node}")
        return [p for p in self.node_pids(node) if daemon is None or p != daemon.pid]

    def log(self, name: str) -> str:
        """A daemon's log: ``slurmctld``, ``slurmd.n1``, ..."""
        path = self.dir / "log" / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""
