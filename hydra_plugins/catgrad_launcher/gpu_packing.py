"""catgrad's local launcher as a Hydra plugin (Hydra instantiates launchers only from the
``hydra_plugins`` package): ``conf/hydra/launcher/local.yaml``. The logic and its contract are
in :mod:`experiments.training.gpu_slots`."""

from experiments.training.gpu_slots import PackingLauncher


class GpuPackingLauncher(PackingLauncher):
    """hydra-joblib-launcher with ``jobs_per_gpu`` (:class:`PackingLauncher`)."""
