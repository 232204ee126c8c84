"""What launch.local and launch.slurm share: reading overrides and fitting the layout to the job's ranks.

Both launchers compose and validate the trainer config before starting anything, fill in `parallel.dp`
from the number of ranks the job will have, and refuse a layout that does not multiply out to it.
"""

from __future__ import annotations

from trainer.config import Config, ConfigError, compose_config


def override_value(overrides: list[str], key: str) -> str | None:
    """The last value given for `key` (`key=v` or `+key=v`), or None."""
    values = [o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0].lstrip("+") == key]
    return values[-1] if values else None


def compose_for_launch(overrides: list[str]) -> Config:
    """The validated config; the run directory is the job's to decide, so any placeholder validates the rest."""
    return compose_config([*overrides, "train.run_dir=."])


def fit_layout(overrides: list[str], ranks: int | None, ranks_text: str,
               config: Config | None = None) -> tuple[Config, list[str]]:
    """Validate the config for a job of `ranks` processes (None: as the config says).

    Returns the config and the overrides with `parallel.dp` explicit, so every rank composes the same
    layout. `ranks_text` says where the count comes from, for the error message (e.g. "nproc=4");
    `config` is `overrides` already composed, if the caller has it.
    """
    config = config or compose_for_launch(overrides)
    tp, pp = config.parallel.tp, config.parallel.pp
    if ranks is not None and override_value(overrides, "parallel.dp") is None:
        if ranks % (tp * pp):
            raise ConfigError(f"{ranks_text}: must be a multiple of parallel.tp*pp = {tp}*{pp}")
        overrides = [*overrides, f"parallel.dp={ranks // (tp * pp)}"]
        config = compose_for_launch(overrides)
    if ranks is not None and config.parallel.world_size != ranks:
        raise ConfigError(f"{ranks_text} but parallel.tp*pp*dp = {tp}*{pp}*{config.parallel.dp} "
                          f"= {config.parallel.world_size}")
    return config, overrides


def tensor_parallel_env(config: Config) -> dict[str, str]:
    """Environment megatron-core's tensor-parallel layers want on GPUs: one hardware queue, so their
    asynchronous all-gathers and reduce-scatters are issued before the matmuls they overlap with."""
    return {"CUDA_DEVICE_MAX_CONNECTIONS": "1"} if config.parallel.tp > 1 else {}
