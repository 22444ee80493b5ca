"""The fixed cost of a Tune trial: N one-epoch trials of a tiny net on the digits through the ensemble's own
path (`orchestrator.tuning.run_trials` -> `orchestrator.train.fit` -> TorchTrainer), beside a plain
`torch.distributed` run of the same epoch with the product's Ray-free step (`orchestrator.step.train_step`).

    .venv/bin/python benchmarks/bench_trials.py                         # 3 trials of resnet8, one at a time
    .venv/bin/python benchmarks/bench_trials.py --trials 6 --concurrent 3 --model resnet20

Per trial it prints:
- start -> 1st step: from Ray's creation of the trial's actor, or Tune's reset of a reused one (Tune has
  its resources), to the first optimizer step of any worker;
- training: first to last optimizer step;
- last step -> end: to Tune's `on_trial_complete` (evaluation, checkpoint, MLflow, teardown);
- CPU-seconds, from each process's own counters (psutil, sampled every 0.2 s until it exits): the Tune
  driver (the trial's `ImplicitFunc` actor, between the trial's start and end), the TrainController, the
  other actors the trial started (Ray Train's, and Tune's queue), and the training workers (their
  data-loader processes included);
- where the start-up went: the driver's start (a new process, or a reused one), its work before it
  creates the TrainController, the controller's start, the workers' start, `init_train_context`, and
  the train function up to the first step.
The reference: the same config's epoch (model, loader, train_step, evaluation, a checkpoint) in
`scaling.num_workers` processes with gloo, started as `torchrun` would start them; the same clock.

The clock: every Ray worker process of the job gets `worker_process_setup_hook` (Ray's public runtime-env
hook), which registers a global optimizer-step hook (`torch.optim.optimizer.register_optimizer_step_post_hook`)
the moment the process imports torch's optimizer module; nothing is imported early. Ray's timestamps of
actor creation come from its state API (`ray.util.state.list_tasks`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# ---------------------------------------------------------------------------------------------
# The step clock: first and last optimizer step per process, written to a folder.


def install_step_clock(folder: str) -> None:
    """Record the first and the last optimizer step of this process in `folder`, once torch's optimizer
    module is imported (a meta-path finder wraps its loading; nothing is imported here)."""
    import importlib.abc
    import importlib.machinery

    state = {"first": None, "last": None, "steps": 0, "key": None}

    def key() -> str:
        try:
            import ray.train

            ctx = ray.train.get_context()
            return f"{ctx.get_experiment_name()}.rank{ctx.get_world_rank()}"
        except Exception:  # noqa: BLE001 - not in Ray Train: the reference run
            return os.environ.get("BENCH_TRIALS_KEY", "reference") + f".rank{os.environ.get('RANK', '0')}"

    def on_step(optimizer, args, kwargs) -> None:
        now = time.time()
        if state["first"] is None:
            state["first"], state["key"] = now, key()
        state["last"] = now
        state["steps"] += 1
        path = Path(folder) / f"{state['key']}.{os.getpid()}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"first": state["first"], "last": now, "steps": state["steps"], "pid": os.getpid()}))
        os.replace(tmp, path)

    def register(module) -> None:
        module.register_optimizer_step_post_hook(on_step)

    if "torch.optim.optimizer" in sys.modules:
        register(sys.modules["torch.optim.optimizer"])
        return

    class Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != "torch.optim.optimizer":
                return None
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            if spec is None or spec.loader is None:
                return spec
            exec_module = spec.loader.exec_module

            def exec_and_register(module):
                exec_module(module)
                register(module)

            spec.loader.exec_module = exec_and_register
            sys.meta_path.remove(self)
            return spec

    sys.meta_path.insert(0, Finder())


def read_clock(folder: Path) -> dict[str, dict]:
    """{run key: {"first", "last", "steps", "pids"}} over the ranks of each run."""
    out: dict[str, dict] = {}
    for f in folder.glob("*.json"):
        run = f.name.split(".rank")[0]
        d = json.loads(f.read_text())
        o = out.setdefault(run, {"first": d["first"], "last": d["last"], "steps": 0, "pids": []})
        o["first"], o["last"] = min(o["first"], d["first"]), max(o["last"], d["last"])
        o["steps"] = max(o["steps"], d["steps"])
        o["pids"].append(d["pid"])
    return out


# ---------------------------------------------------------------------------------------------
# CPU-seconds of every process of the cluster, sampled until each exits.


class CpuSampler(threading.Thread):
    """Every process under `root_pids` (the raylet: Ray's workers and their children), every 0.2 s: its
    CPU-seconds so far, as a time series per process. A process's last sample is within 0.2 s of its end."""

    def __init__(self, root_pids: list[int], interval: float = 0.2):
        super().__init__(daemon=True)
        self.root_pids, self.interval = root_pids, interval
        self.series: dict[int, list[tuple[float, float]]] = {}
        self.parent: dict[int, int] = {}
        self.stop_event = threading.Event()

    def sample(self) -> None:
        import psutil

        procs = []
        for pid in self.root_pids:
            try:
                root = psutil.Process(pid)
                procs += [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
        now = time.time()
        for p in procs:
            try:
                t = p.cpu_times()
                self.parent.setdefault(p.pid, p.ppid())
                self.series.setdefault(p.pid, []).append((now, t.user + t.system))
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.sample()
            self.stop_event.wait(self.interval)

    def stop(self) -> None:
        self.stop_event.set()
        self.join()
        self.sample()

    def cpu(self, pid: int, since: float = 0.0, until: float = float("inf")) -> float:
        """CPU-seconds `pid` used between two times (its whole life by default)."""
        s = self.series.get(pid, [])
        at = lambda t: max((c for ts, c in s if ts <= t), default=0.0)  # noqa: E731
        return at(until) - at(since)

    def tree_cpu(self, pid: int) -> float:
        """CPU-seconds of `pid` and of the processes it started (a training worker's data loaders)."""
        return self.cpu(pid) + sum(self.tree_cpu(c) for c, p in self.parent.items() if p == pid)


# ---------------------------------------------------------------------------------------------
# The trials.


def trial_clock_callback():
    from ray import tune

    class TrialClock(tune.Callback):
        """When Tune saw each trial start and complete, by trial label (on this driver)."""

        def __init__(self):
            self.started: dict[str, float] = {}
            self.ended: dict[str, float] = {}

        def on_trial_start(self, iteration, trials, trial, **info):
            self.started[trial.config["trial"]["label"]] = time.time()

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.ended[trial.config["trial"]["label"]] = time.time()

        on_trial_error = on_trial_complete

    return TrialClock()


def trial_configs(args, data: str) -> list:
    """N members of the ensemble's recipe (ensemble_digits.yaml) with the benchmark's model and epochs;
    distinct seeds give distinct run names."""
    from orchestrator.ensemble import MemberSpec, load_ensemble_config, member_train_config

    cfg, _ = load_ensemble_config(None, [f"train.data.url={data}", f"train.schedule.epochs={args.epochs}",
                                         *(f"train.{o}" for o in args.override)])
    out = []
    for i in range(args.trials):
        m = MemberSpec(label=f"{args.model}-{i}", model=args.model, train=[f"seed={args.seed0 + i}"])
        out.append((m.label, member_train_config(cfg, m)))
    return out


def ray_timeline(job_id: str, address: str) -> dict:
    """Ray's task records of this job: {task_id: task}, with creation/start/end times in seconds."""
    from ray.util.state import list_tasks

    tasks = list_tasks(address=address, filters=[("job_id", "=", job_id)], detail=True, limit=10_000,
                       raise_on_missing_output=False)
    out = {}
    for t in tasks:
        t = t if isinstance(t, dict) else t.__dict__
        out[t["task_id"]] = {
            "name": t.get("func_or_class_name") or "", "type": t.get("type"), "actor_id": t.get("actor_id"),
            "parent": t.get("parent_task_id"), "pid": t.get("worker_pid"),
            "created": (t.get("creation_time_ms") or 0) / 1000, "started": (t.get("start_time_ms") or 0) / 1000,
            "ended": (t.get("end_time_ms") or 0) / 1000,
        }
    return out


def actor_tree(tasks: dict) -> tuple[dict, dict]:
    """(actor_id -> its creation task, actor_id -> the actor that created it or None)."""
    creation = {t["actor_id"]: t for t in tasks.values() if t["type"] == "ACTOR_CREATION_TASK"}
    parent = {}
    for aid, t in creation.items():
        p = tasks.get(t["parent"])
        parent[aid] = p["actor_id"] if p and p.get("actor_id") else None
    return creation, parent


CLUSTER_ACTORS = ("_AutoscalingCoordinatorActor",)  # started once per cluster by the first run, then shared


def classify(name: str) -> str:
    if name.startswith("RayTrainWorker"):
        return "workers"
    if name.startswith("TrainController"):
        return "controller"
    return "other_train_actors"


def analyse(trials: list, tasks: dict, clock: dict, tune_clock, sampler: CpuSampler) -> list[dict]:
    """Per trial: its TrainController (found from the worker that stepped), everything that controller
    started, the Tune driver actor that started the controller and the other actors that driver started
    during the trial; with Tune's actor reuse a driver process runs several trials, and its CPU is
    counted between each trial's start and end."""
    from orchestrator.config import run_name

    creation, parent = actor_tree(tasks)
    pid_actor = {t["pid"]: aid for aid, t in creation.items() if t["pid"]}
    by_actor: dict[str, list] = {}
    for t in tasks.values():
        by_actor.setdefault(t["actor_id"], []).append(t)

    def controller_of(aid):
        while aid and not creation[aid]["name"].startswith("TrainController"):
            aid = parent.get(aid)
        return aid

    def under(aid, top):
        while aid and aid != top:
            aid = parent.get(aid)
        return aid == top

    rows = []
    for label, cfg in trials:
        c = clock.get(run_name(cfg))
        actors = [pid_actor[p] for p in (c or {}).get("pids", []) if p in pid_actor]
        if not c or not actors:
            rows.append({"label": label, "error": "no optimizer step recorded" if not c else "no Ray record of its worker"})
            continue
        ctrl = controller_of(actors[0])
        driver = parent.get(ctrl)
        d_tasks = sorted(by_actor.get(driver, []), key=lambda t: t["created"])
        begins = [t for t in d_tasks if t["name"].endswith(("__init__", ".reset")) and t["created"] <= creation[ctrl]["created"]]
        start = begins[-1]["created"]
        ready = min((t["started"] for t in d_tasks if t["name"].endswith(".train") and t["created"] >= start), default=None)
        end = tune_clock.ended.get(label)
        # The actors this trial started: the controller's, and the driver's own during the trial (Tune's queue).
        train_actors = [aid for aid in creation if not creation[aid]["name"].startswith(CLUSTER_ACTORS) and (
            under(aid, ctrl) or (parent.get(aid) == driver and start <= creation[aid]["created"] <= (end or 1e18)))]
        by_kind: dict[str, list] = {}
        for aid in train_actors:
            by_kind.setdefault(classify(creation[aid]["name"]), []).append(aid)
        cpu = {"tune_driver": sampler.cpu(creation[driver]["pid"], start, end or float("inf"))}
        for kind in ("controller", "other_train_actors", "workers"):
            cpu[kind] = sum(sampler.tree_cpu(creation[aid]["pid"]) for aid in by_kind.get(kind, []) if creation[aid]["pid"])
        workers = by_kind.get("workers", [])
        w_ready = max((creation[a]["ended"] for a in workers), default=None)
        w_tasks = [t for a in workers for t in by_actor.get(a, [])]
        init_ctx = max((t["ended"] for t in w_tasks if t["name"].endswith("init_train_context")), default=None)
        phases = {
            "driver ready" + (" (new process)" if begins[-1]["name"].endswith("__init__") else " (reused)"): (start, ready),
            "fit until controller": (ready, creation[ctrl]["created"]),
            "controller starts": (creation[ctrl]["created"], creation[ctrl]["ended"]),
            "workers start": (creation[ctrl]["ended"], w_ready),
            "init_train_context": (w_ready, init_ctx),
            "train fn until 1st step": (init_ctx, c["first"]),
        }
        rows.append({
            "label": label, "start": start, "first": c["first"], "last": c["last"], "end": end, "steps": c["steps"],
            "to_first": c["first"] - start, "training": c["last"] - c["first"],
            "after_last": (end - c["last"]) if end else None, "cpu": cpu,
            "phases": {k: (b - a if a and b else None) for k, (a, b) in phases.items()},
            "processes": {k: len(v) for k, v in by_kind.items()},
        })
    return rows


# ---------------------------------------------------------------------------------------------
# The reference: the same epoch in plain torch.distributed processes.


def reference_worker(cfg_json: str, folder: str) -> None:
    install_step_clock(folder)
    import torch
    import torch.distributed as dist

    import pipelines
    from orchestrator import step
    from orchestrator.checkpoints import save_checkpoint
    from orchestrator.config import TrainConfig, derived, from_dict

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = from_dict(TrainConfig, json.loads(cfg_json))
    d = derived(cfg)
    device = torch.device("cpu")
    torch.manual_seed(cfg.seed)
    manifest = pipelines.read_manifest(cfg.data.url)
    model = step.build_model(cfg, len(manifest["classes"]), device, world)
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = step.make_optimizer(model, cfg, d["lr_scaled"], device)
    o = step.StepOptions.of(cfg, device, world)
    train_tf, test_tf = step.make_transforms(cfg, manifest)
    common = dict(rank=rank, world_size=world, num_workers=cfg.data.num_workers, seed=cfg.seed)
    val_loader = pipelines.make_loader(cfg.data.url, cfg.data.val_split, d["per_worker_batch"], transform=test_tf,
                                       shuffle=False, **common)
    it = 0
    for epoch in range(cfg.schedule.epochs):
        loader = pipelines.make_loader(cfg.data.url, cfg.data.train_split, d["per_worker_batch"], epoch=epoch,
                                       transform=train_tf, shuffle=True, shuffle_buffer=cfg.data.shuffle_buffer, **common)
        net.train()
        for images, labels in loader:
            images, labels = step.to_device(images, labels, o)
            step.train_step(net, opt, images, labels, step.lr_at(cfg, d["lr_scaled"], it, len(loader), 1.0), o)
            it += 1
        step.evaluate(model, val_loader, device)
        if rank == 0:
            with tempfile.TemporaryDirectory() as tmp:
                save_checkpoint({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch}, Path(tmp))
    if world > 1:
        dist.destroy_process_group()


def reference(cfg, folder: Path) -> dict:
    """Start `num_workers` processes as torchrun would (env:// rendezvous) and time them like a trial."""
    from orchestrator.config import to_dict
    from orchestrator.local_cluster import free_ports

    world = cfg.scaling.num_workers
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_ports(1)[0]), "WORLD_SIZE": str(world),
           "OMP_NUM_THREADS": str(max(1, int(cfg.scaling.cpus_per_worker))), "BENCH_TRIALS_KEY": "reference"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.time()
    procs = [subprocess.Popen([sys.executable, __file__, "--reference-worker", json.dumps(to_dict(cfg)), str(folder)],
                              env={**env, "RANK": str(r)}) for r in range(world)]
    rcs = [p.wait() for p in procs]
    end = time.time()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if any(rcs):
        raise RuntimeError(f"the reference run failed: exit codes {rcs}")
    c = read_clock(folder)["reference"]
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"to_first": c["first"] - start, "training": c["last"] - c["first"], "after_last": end - c["last"],
            "cpu": cpu, "steps": c["steps"]}


# ---------------------------------------------------------------------------------------------


def load_average() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def fmt(x, unit=" s", width=6) -> str:
    return f"{x:{width}.1f}{unit}" if isinstance(x, int | float) else f"{'-':>{width}}{unit}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--concurrent", type=int, default=1, help="trials at once (default 1: each one's cost alone)")
    ap.add_argument("--model", default="resnet8")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--seed0", type=int, default=0)
    ap.add_argument("--data", default=str(ROOT / "data" / "digits"), help="digits shards (written if missing)")
    ap.add_argument("--num-cpus", type=float, default=None, help="CPUs of the local cluster (default: all)")
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the temporary MLflow store and storage")
    ap.add_argument("override", nargs="*", help="train-config overrides for every trial, e.g. scaling.cpus_per_worker=1")
    ap.add_argument("--reference-worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.reference_worker:
        reference_worker(*args.reference_worker)
        return 0
    return bench(args)


def bench(args) -> int:
    from orchestrator.run import _quiet_environment

    _quiet_environment()  # before Ray is imported: the cluster stays on loopback, every line reaches us
    import pipelines

    work = Path(tempfile.mkdtemp(prefix="bench-trials-"))
    clock_dir = work / "clock"
    clock_dir.mkdir()
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work}/mlflow.db"
    data = os.path.abspath(args.data)
    try:
        pipelines.read_manifest(data)
    except Exception:  # noqa: BLE001 - not written yet
        pipelines.write_shards("digits", data, progress=False)
    load_start = load_average()
    import ray

    from orchestrator import local_cluster
    from orchestrator.tuning import Trial, run_trials

    trials = trial_configs(args, data)
    state_file = work / "cluster.json"
    kwargs = {} if args.num_cpus is None else {"num_cpus": args.num_cpus}
    folder = str(clock_dir)
    state = local_cluster.connect(state_file, runtime_env={"worker_process_setup_hook": lambda: install_step_clock(folder)},
                                  **kwargs)
    from orchestrator.ray_compat import drop_known_noise

    drop_known_noise()
    raylet = [p.pid for p in local_cluster.cluster_processes(state) if "raylet" in " ".join(p.cmdline()[:1])]
    sampler = CpuSampler(raylet)
    sampler.start()
    tune_clock = trial_clock_callback()
    cpu0, wall0 = time.process_time(), time.time()
    try:
        errors = run_trials([Trial(label, cfg) for label, cfg in trials], study=f"bench-trials-{int(wall0)}",
                            storage=str(work / "runs"), experiment="bench-trials", max_concurrent_trials=args.concurrent,
                            callbacks=[tune_clock])
        study_wall, driver_cpu = time.time() - wall0, time.process_time() - cpu0
        sampler.stop()
        tasks = ray_timeline(ray.get_runtime_context().get_job_id(), f"http://127.0.0.1:{state['dashboard_port']}")
    finally:
        ray.shutdown()
        local_cluster.stop(state_file)
    if errors:
        print(f"error: trials failed: {errors}", file=sys.stderr)
        return 1
    rows = analyse(trials, tasks, read_clock(clock_dir), tune_clock, sampler)
    if args.keep:
        (work / "raw.json").write_text(json.dumps({"tasks": tasks, "cpu": sampler.series, "parent": sampler.parent,
                                                   "started": tune_clock.started, "ended": tune_clock.ended,
                                                   "rows": rows}, indent=1, default=str))
        print(f"raw data: {work / 'raw.json'}")
    ref = None if args.no_reference else reference(trials[0][1], clock_dir)
    load_end = load_average()
    report(args, trials, rows, ref, study_wall, driver_cpu, load_start, load_end)
    if not args.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return 0


def report(args, trials, rows, ref, study_wall, driver_cpu, load_start, load_end) -> None:
    import ray
    import torch

    cfg = trials[0][1]
    print(f"python {platform.python_version()}  torch {torch.__version__}  ray {ray.__version__}  "
          f"{os.cpu_count()} CPUs  load average {load_start} at the start, {load_end} at the end")
    print(f"{len(trials)} trials of {cfg.model.name}, {cfg.schedule.epochs} epoch(s) of the digits, "
          f"{cfg.scaling.num_workers} worker(s) x {cfg.scaling.cpus_per_worker:g} CPU, {args.concurrent} at a time; "
          f"the study took {study_wall:.1f} s; the Tune driver process (this one) used {driver_cpu:.1f} CPU-s")
    head = (f"{'trial':<12} {'start->1st step':>15} {'training':>9} {'last step->end':>15}   CPU-s: "
            f"{'tune driver':>11} {'controller':>10} {'other actors':>12} {'workers':>8}  control/workers")
    print(head)
    for r in rows:
        if "error" in r:
            print(f"{r['label']:<12} {r['error']}")
            continue
        c = r["cpu"]
        control = c["tune_driver"] + c["controller"] + c["other_train_actors"]
        print(f"{r['label']:<12} {fmt(r['to_first'], ' s', 13)} {fmt(r['training'], ' s', 7)} {fmt(r['after_last'], ' s', 13)}"
              f"          {c['tune_driver']:11.1f} {c['controller']:10.1f} {c['other_train_actors']:12.1f} "
              f"{c['workers']:8.1f}  {control / max(c['workers'], 1e-9):8.2f}")
    ok = [r for r in rows if "error" not in r]
    if ok:
        med = {k: statistics.median(r[k] for r in ok if r[k] is not None) for k in ("to_first", "training", "after_last")}
        print(f"{'median':<12} {fmt(med['to_first'], ' s', 13)} {fmt(med['training'], ' s', 7)} {fmt(med['after_last'], ' s', 13)}")
        print("where the start went (s):")
        for r in ok:
            print(f"  {r['label']:<12} " + ", ".join(f"{k} {fmt(v, '', 0).strip()}" for k, v in r["phases"].items()))
        print("processes per trial (last trial; the driver's besides): " + ", ".join(
            f"{k.replace('_', ' ')} {v}" for k, v in ok[-1]["processes"].items()))
    if ref:
        print(f"{'plain torch.distributed':<24} start->1st step {ref['to_first']:.1f} s, training {ref['training']:.1f} s, "
              f"last step->end {ref['after_last']:.1f} s, {ref['cpu']:.1f} CPU-s in all")
        if ok:
            print(f"ratios trial / plain: start->1st step {med['to_first'] / ref['to_first']:.1f}x, "
                  f"training {med['training'] / max(ref['training'], 1e-9):.2f}x, "
                  f"last step->end {med['after_last'] / max(ref['after_last'], 1e-9):.1f}x")
    goal_first, goal_last = 10.0, 3.0
    if ok:
        print(f"goal: start->1st step {med['to_first']:.1f} s (<= {goal_first:g} s on an idle 2-core machine): "
              f"{'met' if med['to_first'] <= goal_first else 'NOT met'}; last step->end {med['after_last']:.1f} s "
              f"(<= {goal_last:g} s): {'met' if med['after_last'] <= goal_last else 'NOT met'}")


if __name__ == "__main__":
    sys.exit(main())
