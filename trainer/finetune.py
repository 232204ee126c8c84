"""Fine-tuning entry point: `python -m trainer.finetune train.init_from=CKPT data.prepared_dir=SFT_DIR [overrides]`.

The pretraining entry point (trainer/pretrain.py: the same validation, one-line errors, preemption and
multirun) with conf/finetune.yaml as its primary config: the root config with the `train/finetune` preset
(epochs over the data, a lower learning rate, a short warmup) and runs in `runs/<model>-finetune`. It
starts from weights, so train.init_from is required; with train.epochs set, data.prepared_dir must be
fine-tuning data (`python -m data_pipeline.prepare_sft`). Both are checked before anything is imported or
prepared.
"""

from __future__ import annotations

import json
from pathlib import Path

import hydra
from omegaconf import DictConfig

from trainer.config import CONF_DIR, Config, ConfigError
from trainer.pretrain import main, run_job


def check_finetune(config: Config) -> None:
    """Refuse a fine-tuning run with no weights to start from, or epochs over a directory of pretraining data."""
    from data_pipeline.prepare import INDEX_FILE, is_remote

    if not config.train.init_from:
        raise ConfigError("train.init_from: fine-tuning starts from a model; name a checkpoint or a Hugging Face "
                          "GPT-2 directory (e.g. train.init_from=runs/tiny/checkpoints/step_00000600)")
    prepared = config.data.prepared_dir
    if config.train.epochs is None or is_remote(prepared):
        return
    try:
        kind = json.loads((Path(prepared) / INDEX_FILE).read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        kind = None
    if kind != "sft":
        raise ConfigError(f"train.epochs={config.train.epochs}: data.prepared_dir={prepared} holds no fine-tuning "
                          "data (prepare it with python -m data_pipeline.prepare_sft), or set train.epochs=null")


@hydra.main(config_path=CONF_DIR, config_name="finetune", version_base="1.3")
def finetune(cfg: DictConfig) -> None:
    """Validate the composed config and the fine-tuning requirements, then train."""
    run_job(cfg, check_finetune)


if __name__ == "__main__":
    main(finetune)
