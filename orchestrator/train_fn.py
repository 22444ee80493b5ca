"""What the driver (`orchestrator.train`) hands to Ray Train, in a module that imports nothing.

Ray pickles a function by reference, and every process that unpickles it, or the module that names it,
imports its module. The worker loop's module (`orchestrator.worker`) imports torch, torchvision, the
pipelines and MLflow: measured, about 2 CPU-seconds in each process that imported it only to pass the
loop on or to print a line (every Tune trial's driver and every TrainController; see BENCHMARKS.md,
"The fixed cost of a trial"). Here those imports happen only where the loop runs, in the training
workers.
"""

from __future__ import annotations


def train_loop_per_worker(loop_config: dict) -> None:
    from .worker import train_loop_per_worker as loop

    loop(loop_config)


def say(line: str) -> None:
    """`worker.say`: one line to the console, once."""
    from .worker import say as say_once

    say_once(line)
