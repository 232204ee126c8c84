"""Export a checkpoint of any layout as one safetensors file: `python -m trainer.export CKPT [--out FILE]`.

The file holds the single-process GPT's weights (tp shards joined, pipeline stages merged, vocabulary
padding removed) and, as metadata, the model config and vocabulary size needed to rebuild it. It is written
to `<checkpoint>/consolidated.safetensors` by default: our parameter names, not a Hugging Face model (for one,
`python -m trainer.convert to-hf CKPT --out DIR`). A LoRA checkpoint is exported merged into its base model,
named with `--base DIR`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from trainer.checkpoint import CheckpointError, CheckpointReader
from trainer.inference import ModelLoadError, add_base_argument, read_model_weights

log = logging.getLogger(__name__)
VOCAB_ROWS = ("embedding.tokens.weight",)
# Our names and metadata, not a Hugging Face model.safetensors (trainer/convert.py writes those).
CONSOLIDATED_FILE = "consolidated.safetensors"


def consolidated_weights(reader: CheckpointReader) -> dict[str, torch.Tensor]:
    """Every weight of the checkpoint, whole, under its single-process name."""
    vocab = reader.state.vocab_size
    weights = {}
    for name in reader.parameter_names():
        tensor = reader.read(name)
        if name in VOCAB_ROWS and vocab:
            tensor = tensor[:vocab]
        weights[name] = tensor.contiguous()
    return weights


def export(checkpoint: Path, out: Path, base: Path | None = None) -> Path:
    """Write the consolidated model (LoRA adapters merged into `base`) to `out` atomically; returns its path."""
    reader = CheckpointReader(checkpoint)
    adapters = reader.state.adapters is not None
    weights = read_model_weights(checkpoint, base).weights if adapters else consolidated_weights(reader)
    metadata = {
        "model": json.dumps(reader.state.config["model"]),
        "vocab_size": str(reader.state.vocab_size),
        "step": str(reader.state.step),
        "saved_layout": json.dumps(reader.state.layout),
        **({"adapters_merged_into": str(base)} if adapters else {}),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file(weights, str(tmp), metadata=metadata)
    tmp.replace(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="a checkpoint directory (runs/<name>/checkpoints/step_N)")
    parser.add_argument("--out", type=Path, help="output file (default: <checkpoint>/consolidated.safetensors; "
                        "not a Hugging Face file: `python -m trainer.convert to-hf` writes one)")
    add_base_argument(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(levelname)s] %(message)s", datefmt="%H:%M:%S")
    out = args.out or args.checkpoint / CONSOLIDATED_FILE
    try:
        export(args.checkpoint, out, args.base)
    except (CheckpointError, ModelLoadError) as err:
        log.error("error: %s", err)
        return 2
    log.info("exported %s to %s", args.checkpoint, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
