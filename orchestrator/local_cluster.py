"""A private Ray cluster on this machine, on loopback, with token authentication: what
`scripts/run.sh` starts for the embedded default and what the tests start as a multi-node topology.

    python -m orchestrator.local_cluster start --state FILE [--num-cpus N]   # head node
    python -m orchestrator.local_cluster add-node --state FILE --num-cpus N   # another node
    python -m orchestrator.local_cluster stop --state FILE                    # only this cluster
    python -m orchestrator.local_cluster watch --state FILE --pid PID         # stop it once PID has ended

- Free ports are chosen for everything Ray would otherwise put on a fixed default (GCS 6379,
  dashboard 8265, client server 10001, dashboard agent 52365, ...), so it never collides with another
  Ray cluster or service on the machine.
- Every node is started with `--node-ip-address 127.0.0.1` and the dashboard on 127.0.0.1, under
  RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: without it `ray start` turns 127.0.0.1 into the machine's
  routable address (services.resolve_ip_for_localhost) and the GCS, raylet and agents listen on all
  interfaces; with it, Ray's gRPC servers and agents bind 127.0.0.1 (infra/README.md, "Loopback").
- `ray start --head` turns token authentication on; its token is ~/.ray/auth_token. It is created
  here when missing (a 0600 file in a 0700 folder, as Ray would write it but private) and never
  turned off.
- `stop` ends only the processes of this cluster (those started under its own temp dir); `ray stop`
  would end every Ray process on the machine, other users' clusters included.
- Nothing is left behind: `connect()` (a command given no cluster address) stops its cluster when the
  command ends, fails, or gets Ctrl-C, SIGTERM or SIGHUP, and a watchdog process (`watch`, also
  `start --watch-pid`) stops it when the command dies any other way (SIGKILL).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Keeps 127.0.0.1 as the node's address (Ray 2.60 reads it in ray_constants.ENABLE_RAY_CLUSTER). And:
# Tune trials' drivers ask for 0.01 CPU by design, so the raylet warned "N worker processes ... Nx the
# maximum expected startup concurrency (2)" at every start: allow more concurrent starts.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_worker_maximum_startup_concurrency": "8"}
# Defaults for what runs on this cluster, unless the environment sets them: Ray Train's preemption
# watcher (an actor per training run, about 1.5 CPU-s to start) watches for nodes that a cloud provider
# drains; the nodes of this cluster are processes on this machine, which no one drains.
LOCAL_DEFAULTS = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def token_path() -> Path:
    return Path.home() / ".ray" / "auth_token"


class LocalClusterError(RuntimeError):
    """The local cluster could not be started or reached; the message says what to do."""


def ensure_token(path: Path | None = None) -> Path:
    """The Ray token file, created when missing; the file is made 0600 and its folder 0700 either way."""
    path = path or token_path()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    if not path.exists() or not path.read_text().strip():
        # Ray's own generator: 256 random bits as hex (ray/_private/authentication/...token_generator.py).
        # Written aside and linked into place: of two commands started at once in a new HOME, the first
        # one's token is the token (two writers of one file each started a cluster with its own token).
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        try:
            os.link(tmp, path)
        except FileExistsError:
            if not path.read_text().strip():  # an empty file left by something else: replace it
                os.replace(tmp, path)
        except OSError:  # a filesystem without hard links: the last writer wins, as before
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    os.chmod(path, 0o600)
    return path


def free_ports(n: int) -> list[int]:
    """`n` distinct ports that are free on 127.0.0.1 right now."""
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def _node_ports(n_extra: int = 0) -> dict:
    names = ["node_manager_port", "object_manager_port", "dashboard_agent_listen_port", "dashboard_agent_grpc_port",
             "runtime_env_agent_port", "metrics_export_port"]
    ports = free_ports(len(names) + n_extra)
    return dict(zip(names, ports, strict=False)), ports[len(names):]


def _node_flags(ports: dict, num_cpus: float | None, resources: dict | None) -> list[str]:
    flags = ["--node-ip-address=127.0.0.1", "--disable-usage-stats"]
    for key, port in ports.items():
        flags.append(f"--{key.replace('_', '-')}={port}")
    if num_cpus is not None:
        flags.append(f"--num-cpus={num_cpus:g}")
    if resources:
        flags.append(f"--resources={json.dumps(resources)}")
    return flags


def _run_ray(args: list[str], env: dict, cli: list[str] | None = None) -> None:
    """`ray ARGS` (or the same CLI through `cli`, a command that runs it), failing with its last lines."""
    out = subprocess.run([*(cli or [str(Path(sys.executable).with_name("ray"))]), *args], env=env,
                         capture_output=True, text=True)
    if out.returncode != 0:
        tail = "\n".join((out.stderr or out.stdout).strip().splitlines()[-5:])
        raise LocalClusterError(f"`ray {' '.join(args[:2])}` failed (exit {out.returncode}):\n{tail}")


def start(state_file: Path, *, num_cpus: float | None = None, resources: dict | None = None,
          temp_dir: str | None = None, timeout: float = 90.0, env: dict | None = None,
          watch_pid: int | None = None) -> dict:
    """Start a head node; its ports, temp dir and address go to `state_file` (JSON). `env`: the node's
    environment (default: this process's), which its workers and jobs inherit; `watch_pid`: a process
    whose end stops the cluster (a watchdog, `watch`, is started for it)."""
    ensure_token()
    ports, (gcs, dashboard, client) = _node_ports(3)
    # A short path of its own: Ray's Unix sockets live under it (at most 107 characters).
    temp_dir = temp_dir or tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    # RAY_ADDRESS in every process of the cluster: Ray Train's helpers look their cluster up by "auto",
    # which fails with "Found multiple active Ray instances" when another cluster runs on the machine.
    env = {**LOCAL_DEFAULTS, **(os.environ if env is None else env), **LOOPBACK_ENV, "RAY_AUTH_MODE": "token",
           "RAY_ADDRESS": f"127.0.0.1:{gcs}"}
    # The state first: whatever `ray start` has started when it fails or is interrupted can be stopped.
    state = {"gcs_address": f"127.0.0.1:{gcs}", "dashboard_port": dashboard, "temp_dir": temp_dir, "nodes": 1,
             "node_manager_ports": [ports["node_manager_port"]]}
    state_file.write_text(json.dumps(state, indent=2))
    if watch_pid:
        _start_watchdog(state_file, watch_pid, env)
    _run_ray(
        ["start", "--head", f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         "--include-dashboard=true", f"--ray-client-server-port={client}", f"--temp-dir={temp_dir}",
         *_node_flags(ports, num_cpus, resources)],
        env,
    )
    _wait_for_dashboard(state, timeout)
    return state


def add_node(state_file: Path, *, num_cpus: float | None = None, resources: dict | None = None,
             env: dict | None = None) -> dict:
    """Start one more node of the cluster in `state_file` (e.g. a second 'machine' for drills)."""
    state = json.loads(state_file.read_text())
    ports, _ = _node_ports()
    env = {**LOCAL_DEFAULTS, **(os.environ if env is None else env), **LOOPBACK_ENV, "RAY_AUTH_MODE": "token",
           "RAY_ADDRESS": state["gcs_address"]}
    # With RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (what keeps the node on 127.0.0.1) `ray start --address`
    # refuses to add a node ("Multi-node Ray clusters are not supported on Windows and OSX"). Run the
    # same CLI with only that refusal lifted: this process keeps 127.0.0.1 as given, and the node's own
    # processes inherit the variable, so they bind loopback like the head's (see ray_compat).
    from .ray_compat import LOOPBACK_NODE_CLI

    # Its own temp dir, as another machine has its own disk: nodes sharing one would share Ray's package
    # cache, and one node's garbage collection deleted the working directory another node's job ran in.
    node_temp = tempfile.mkdtemp(prefix="ray-node-", dir="/tmp")
    argv = ["start", f"--address={state['gcs_address']}", f"--temp-dir={node_temp}",
            *_node_flags(ports, num_cpus, resources)]
    _run_ray(argv, env, cli=[sys.executable, "-c", LOOPBACK_NODE_CLI])
    state["nodes"] = state.get("nodes", 1) + 1
    state.setdefault("node_manager_ports", []).append(ports["node_manager_port"])
    state.setdefault("node_temp_dirs", []).append(node_temp)
    state_file.write_text(json.dumps(state, indent=2))
    return state


def _wait_for_dashboard(state: dict, timeout: float) -> None:
    import urllib.request

    url = f"http://127.0.0.1:{state['dashboard_port']}/api/version"
    token = token_path().read_text().strip() if token_path().exists() else ""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
            with urllib.request.urlopen(req, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise LocalClusterError(f"the Ray dashboard did not answer on {url} within {timeout:.0f} s")


def connect(state_file: Path | None = None, *, runtime_env: dict | None = None, **start_kwargs) -> dict:
    """Start a private cluster and connect this driver to it; `runtime_env`: the job's (e.g. a
    `worker_process_setup_hook`). The cluster is stopped, all of it, when this process ends: when it
    returns or fails, on Ctrl-C, SIGTERM or SIGHUP (all three end it through Python's exit path), and,
    should it die without that path (SIGKILL, a crash), by a watchdog process (`watch`)."""
    import atexit

    import ray

    if state_file is None:
        fd, name = tempfile.mkstemp(prefix="resnet-ray-", suffix=".json")
        os.close(fd)
        state_file = Path(name)
    _exit_on_signals()
    # Registered after `import ray`, so it runs before Ray's own atexit shutdown (handlers run last in,
    # first out): the driver leaves the cluster before the cluster stops. The other order made a job that
    # had finished exit 1: its raylet went first, the driver's core worker tried to recover the objects it
    # owned ("Attempting to recover 4 lost objects by resubmitting their tasks...") and ended the process
    # with code 1, part-way through the stop (so the GCS, which waits for the raylets, never got its
    # SIGKILL and stayed, parented to init).
    atexit.register(disconnect_and_stop, state_file)
    state = start(state_file, watch_pid=os.getpid(), **start_kwargs)
    print(f"[ray] a local Ray cluster for this command (dashboard http://127.0.0.1:{state['dashboard_port']}, "
          f"GCS {state['gcs_address']}, logs {state['temp_dir']}/session_latest/logs); it stops when the command "
          "ends", flush=True)
    for k, v in LOCAL_DEFAULTS.items():  # this driver starts Ray Train runs too (the `train` command)
        os.environ.setdefault(k, v)
    from .ray_compat import enable_token_auth

    enable_token_auth()
    ray.init(address=state["gcs_address"], log_to_driver=True, runtime_env=runtime_env)
    _exit_on_signals(replace=True)  # Ray's core worker put its crash handler on SIGTERM (it aborts, exit 134)
    return state


def disconnect_and_stop(state_file: Path) -> None:
    """This driver leaves its cluster (`ray.shutdown`), then the cluster stops."""
    import ray

    try:
        if ray.is_initialized():
            ray.shutdown()
    finally:
        stop(state_file)


def _exit_on_signals(replace: bool = False) -> None:
    """SIGTERM and SIGHUP end this process through Python's exit path (SystemExit, so `atexit` stops the
    cluster) with a line that says so, instead of at once, which left the cluster's daemons running. Ctrl-C
    already does (a KeyboardInterrupt). `replace`: also over a handler already there; after `ray.init`
    the driver's SIGTERM handler is Ray's C++ crash handler, which prints a stack and aborts the process
    (measured: exit code 134, no cleanup)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if replace or signal.getsignal(sig) == signal.SIG_DFL:
            signal.signal(sig, _exit_for_signal)


def _exit_for_signal(signum, frame) -> None:
    import signal

    # The exit code is 128 + the signal, or 1 where Ray's wait turns the SystemExit into its own.
    os.write(2, f"error: stopped by {signal.Signals(signum).name}; stopping the local Ray cluster\n".encode())
    sys.exit(128 + signum)


def cluster_processes(state: dict) -> list:
    """Every process of this cluster: those whose command line names its temp dir or its GCS address (Ray's
    client server, `ray.util.client.server --address=GCS`, names only that, and outlived every stop
    before: it stays minutes after its GCS is gone), and their children."""
    import psutil

    markers = [state["temp_dir"], *state.get("node_temp_dirs", [])]
    gcs = state.get("gcs_address")

    def ours(cmdline: list[str]) -> bool:
        return any(m in part for part in cmdline for m in markers) or bool(
            gcs and any(part.startswith("--") and part.split("=", 1)[-1] == gcs for part in cmdline))

    me = psutil.Process()
    skip = {me.pid, *(p.pid for p in me.parents())}  # the caller's command line may name the folder too
    found = {}
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if p.pid not in skip and ours(p.info["cmdline"] or []):
                found[p.pid] = p
                for c in p.children(recursive=True):
                    found[c.pid] = c
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return list(found.values())


def _running(p) -> bool:
    import psutil

    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def stop(state_file: Path, grace: float = 10.0) -> int:
    """End this cluster's processes only, in the order `ray stop` uses: the raylets (their workers go with
    them), then the other daemons (the watchdog too), then the GCS, which ignores SIGTERM while raylets are
    connected to it (measured: still running 20 s after it). Each group gets SIGTERM, then SIGKILL after
    `grace` seconds. Returns how many processes it ended."""
    import psutil

    if not state_file.exists():
        return 0
    state = json.loads(state_file.read_text())
    procs = [p for p in cluster_processes(state) if _running(p)]
    names = {}
    for p in procs:
        try:
            names[p.pid] = p.name()
        except psutil.NoSuchProcess:
            names[p.pid] = ""
    groups = [
        [p for p in procs if names[p.pid] == "raylet"],
        [p for p in procs if names[p.pid] not in ("raylet", "gcs_server")],
        [p for p in procs if names[p.pid] == "gcs_server"],
    ]
    for group in groups:
        _terminate(group, grace)
    state_file.unlink(missing_ok=True)
    return len(procs)


def _terminate(procs: list, grace: float) -> None:
    import psutil

    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)


def watch(state_file: Path, pid: int, poll: float = 0.5) -> None:
    """Stop the cluster in `state_file` once process `pid` has ended, however it ended (the safety net of
    `connect` and of `scripts/run.sh`: a driver killed with SIGKILL runs no cleanup of its own)."""
    import psutil

    try:
        target = psutil.Process(pid)
        while target.is_running() and target.status() != psutil.STATUS_ZOMBIE and state_file.exists():
            time.sleep(poll)
    except psutil.NoSuchProcess:
        pass
    stop(state_file)


def _start_watchdog(state_file: Path, pid: int, env: dict) -> None:
    """`watch` in a process of its own session (a Ctrl-C to the terminal's process group does not reach
    it), its output in the cluster's temp dir, which its command line names: it is one of the cluster's
    processes (`cluster_processes`), and `stop` ends it with the others."""
    temp_dir = json.loads(state_file.read_text())["temp_dir"]
    with open(Path(temp_dir) / "watchdog.log", "ab") as log:
        subprocess.Popen(
            [sys.executable, "-m", "orchestrator.local_cluster", "watch", "--state", str(state_file), "--pid", str(pid),
             "--temp-dir", temp_dir],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True, env=env,
            cwd=str(Path(__file__).resolve().parent.parent),
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m orchestrator.local_cluster", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, help_text in (("start", "start a head node"), ("add-node", "add a node"), ("stop", "stop this cluster"),
                            ("watch", "stop this cluster once process PID has ended")):
        s = sub.add_parser(name, help=help_text)
        s.add_argument("--state", required=True, type=Path, help="JSON file with the cluster's ports and temp dir")
        if name in ("start", "add-node"):
            s.add_argument("--num-cpus", type=float, default=None, help="CPUs this node offers (default: all)")
        if name == "start":
            s.add_argument("--temp-dir", default=None, help="Ray's temp dir (default: a new /tmp/ray-XXXX)")
            s.add_argument("--watch-pid", type=int, default=None,
                           help="stop the cluster when this process ends, however it ends (e.g. the calling shell's $$)")
        if name == "watch":
            s.add_argument("--pid", required=True, type=int, help="the process whose end stops the cluster")
            s.add_argument("--temp-dir", default=None, help="the cluster's temp dir: names this process as one of its own")
    args = p.parse_args(argv)
    try:
        if args.cmd == "start":
            _exit_on_signals()  # interrupted, the state file still names what to stop
            state = start(args.state, num_cpus=args.num_cpus, temp_dir=args.temp_dir, watch_pid=args.watch_pid)
            print(f"local Ray cluster: dashboard http://127.0.0.1:{state['dashboard_port']}, "
                  f"GCS {state['gcs_address']}, logs {state['temp_dir']}/session_latest/logs")
        elif args.cmd == "add-node":
            add_node(args.state, num_cpus=args.num_cpus)
        elif args.cmd == "watch":
            watch(args.state, args.pid)
        else:
            stop(args.state)
    except LocalClusterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
