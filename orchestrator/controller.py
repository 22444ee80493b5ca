"""What runs inside Ray Train's controller: this project's `ray.train.UserCallback`s.

Ray Train's controller is an actor that unpickles these callbacks, so it imports this module: keep it
light (Ray is already loaded there; nothing here imports torch or MLflow at import time).

- `FailFast`: an error that a retry cannot fix (bad data, a corrupt checkpoint, a config error; see
  `preflight.is_deterministic`) fails the run at once instead of spending the worker-group restarts
  (`checkpoint.max_failures`) on failing the same way. A `ray.train.ControllerError` raised from
  `after_exception` is final in Ray 2.60: its failure policy retries only worker-group errors and
  worker-group start-up failures.
- `EpochReportsToTune`: Tune schedulers (ASHA) see one result per epoch, not the reports of the
  checkpoints taken between epochs.
"""

from __future__ import annotations

import ray.train


class FailFast(ray.train.UserCallback):
    def after_exception(self, run_context, worker_exceptions: dict) -> None:
        from .preflight import is_deterministic

        for _, err in sorted(worker_exceptions.items()):
            if is_deterministic(err):
                raise ray.train.ControllerError(err)


def epoch_reports_to_tune():
    """A callback that forwards the epoch reports to the Tune trial this run belongs to."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class EpochReportsToTune(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint) -> None:
            if metrics and metrics[0].get("kind") == "epoch":
                super().after_report(run_context, metrics, checkpoint)

    return EpochReportsToTune()
