"""Entry point: `python -m orchestrator.run <command> ...` (also inside `ray job submit -- ...`).

Each command lives in its own module, which defines `add_arguments(parser)` and `main(args) -> int`;
only the chosen command's module is imported.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .config import ConfigError

# command -> (module, one-line help)
COMMANDS = {
    "train": ("orchestrator.commands.train", "train one network of the zoo with a recipe from orchestrator/configs/"),
    "ablate": ("orchestrator.commands.ablate", "run one of the papers' ablation studies as Ray Tune trials"),
    "ensemble": ("orchestrator.commands.ensemble", "train, evaluate, register and batch-evaluate a ResNet ensemble"),
    "evaluate": ("orchestrator.commands.evaluate", "batch-evaluate a registered model on a data split, on the cluster"),
    "bench": ("orchestrator.commands.bench", "measure model, loader and end-to-end training throughput (and MFU)"),
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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
