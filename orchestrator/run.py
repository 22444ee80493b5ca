"""Entry point: `python -m orchestrator.run <command> ...` (also inside `ray job submit -- ...`).

Each command lives in its own module, which defines `add_arguments(parser)` and `main(args) -> int`;
only the chosen command's module is imported.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings

from .config import ConfigError

# command -> (module, one-line help)
COMMANDS = {
    "train": ("orchestrator.commands.train", "train one network of the zoo with a recipe from orchestrator/configs/recipes/"),
    "ablate": ("orchestrator.commands.ablate", "run one of the papers' ablation studies as Ray Tune trials"),
    "ensemble": ("orchestrator.commands.ensemble", "train, evaluate, register and batch-evaluate a ResNet ensemble"),
    "evaluate": ("orchestrator.commands.evaluate", "batch-evaluate a registered model on a data split, on the cluster"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m orchestrator.run",
        description="Train, ablate and ensemble the ResNet family on Ray, tracked in MLflow.",
        epilog="Run 'python -m orchestrator.run COMMAND --help' for a command's options.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        if name != command:
            sub.add_parser(name, help=help_text)
            continue
        module = importlib.import_module(module_name)
        p = sub.add_parser(
            name, help=help_text, description=module.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        module.add_arguments(p)
        p.set_defaults(func=module.main)
    return parser


def command_environment() -> None:
    """Before Ray is imported (by every command, and by the scripts in benchmarks/): every worker's epoch
    line must reach the console, a local cluster stays on loopback, and no warning should reach a user
    that they cannot act on. Ray's log deduplication folds lines that look alike across workers (it
    swallowed epoch lines)."""
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    address = os.environ.get("RAY_ADDRESS", "")
    if not address or address.split("://")[-1].startswith(("127.0.0.1", "localhost")):
        # A private local cluster, or one on this machine's loopback: its node address stays 127.0.0.1
        # (see local_cluster.py); a driver that connects by GCS address needs the same setting.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per member download
    # MLflow's advice on type hints and input examples is for pyfunc authors; our signature is explicit.
    warnings.filterwarnings("ignore", message=".*[Tt]ype hint.*")
    warnings.filterwarnings("ignore", message=".*input_example.*")
    import logging

    for name in ("mlflow.store.db.utils", "alembic.runtime.migration"):  # a new mlflow.db announces its tables
        logging.getLogger(name).setLevel(logging.WARNING)
    try:  # the S3 endpoint's settings (checksums only when required) for this process and its children
        from pipelines.storage import s3_compat_env

        for k, v in s3_compat_env().items():
            os.environ.setdefault(k, v)
    except ImportError:
        pass


def input_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean bad input or an impossible request: one line, exit code 2."""
    from pipelines import DataError, ManifestMismatchError, StorageError

    from .batch_eval import EvaluationError
    from .checkpoints import CheckpointIntegrityError
    from .cluster import ClusterTooSmall, UserPathError
    from .local_cluster import LocalClusterError

    return (ConfigError, DataError, ManifestMismatchError, StorageError, EvaluationError, ClusterTooSmall,
            UserPathError, LocalClusterError, CheckpointIntegrityError)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command_environment()
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    os.environ.setdefault("ORCHESTRATOR_COMMAND", "python -m orchestrator.run " + " ".join(argv[:1]))
    return run_command(args.func, args)


def run_command(func, args) -> int:
    """`func(args)` with the commands' error contract: bad input or an impossible request is one line
    (`error: ...`) and exit code 2, a training that failed on the cluster one line and exit code 1."""
    try:
        return func(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        from .train import TrainingFailed

        if isinstance(e, input_errors()):
            print(f"error: {_one_line(e)}", file=sys.stderr)
            return 2
        if isinstance(e, TrainingFailed):
            print(f"error: training failed: {e}", file=sys.stderr)
            return 1
        raise


def _one_line(e: BaseException) -> str:
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    return " ".join(lines[:3]) if lines else type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
