"""Population-based training as a sweep runs it (``tune.scheduler=pbt``, :mod:`.sweep_search`). Imports Ray: load it
only where the scheduler is built (a Tune ``Tuner`` pickles it by reference to this module)."""

from __future__ import annotations

from typing import Any

from ray.tune.schedulers import PopulationBasedTraining, TrialScheduler


class LastEpochKept(PopulationBasedTraining):
    """Synchronous PBT (``synch=True``: every trial of a perturbation step copies a checkpoint of the same epoch, so
    a trial's run directory continues where its own history ends) that never perturbs at a trial's last epoch (a
    copy there would train nothing: the trial's run directory would keep its own numbers under the copied values)."""

    def __init__(self, *, last_epoch: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.last_epoch = last_epoch

    def on_trial_result(self, tune_controller, trial, result: dict[str, Any]) -> str:
        if int(result.get(self._time_attr, 0)) >= self.last_epoch:
            return TrialScheduler.CONTINUE
        return super().on_trial_result(tune_controller, trial, result)
