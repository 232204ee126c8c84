"""Convert between Hugging Face GPT-2 directories and our checkpoints.

    python -m trainer.convert from-hf HF_DIR --out CKPT_DIR   a weights-only checkpoint (tp=pp=dp=1) and its
                                                             tokenizer.json: `train.init_from` and inference take it
    python -m trainer.convert to-hf CKPT --out HF_DIR        a checkpoint of any layout (or an HF directory) as a
                                                             directory `transformers` loads with from_pretrained
        [--base BASE]                                        a LoRA checkpoint: its adapters merged into BASE

A problem is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

from trainer.checkpoint import CheckpointError, TrainerState, write_weights_checkpoint
from trainer.hf_gpt2 import HfExportError, read_hf_directory, write_hf_directory
from trainer.inference import ModelLoadError, ModelWeights, add_base_argument, build_model, read_model_weights
from trainer.sharded_state import partition_dim

log = logging.getLogger(__name__)
SINGLE_PROCESS = {"tp": 1, "pp": 1, "dp": 1}


def from_hf(hf_dir: Path, out: Path) -> Path:
    """Write the Hugging Face GPT-2 model at `hf_dir` as a weights-only checkpoint at `out`."""
    weights = read_hf_directory(hf_dir)
    model = build_model(weights)  # the training layout: vocabulary rows padded, partition dims marked
    state = TrainerState(step=0, tokens_seen=0, layout=dict(SINGLE_PROCESS),
                         config={"model": dataclasses.asdict(weights.config)}, vocab_size=weights.vocab_size,
                         weights_only=True)
    tensors = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    dims = {name: partition_dim(param) for name, param in model.named_parameters()}
    return write_weights_checkpoint(out, state, tensors, dims, weights.tokenizer_json)


def to_hf(checkpoint: Path, out: Path, base: Path | None = None) -> Path:
    """Write the checkpoint at `checkpoint` (any layout; LoRA adapters merged into `base`) as a Hugging Face
    GPT-2 directory at `out`."""
    weights: ModelWeights = read_model_weights(checkpoint, base)
    if weights.tokenizer_json is None:
        log.warning("%s has no tokenizer.json: %s is written without tokenizer files (AutoTokenizer will not "
                    "load it; copy in the tokenizer the model was trained with)", checkpoint, out)
    return write_hf_directory(weights, out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    imports = commands.add_parser("from-hf", help="a Hugging Face GPT-2 directory as a weights-only checkpoint")
    imports.add_argument("hf_dir", type=Path, help="a directory with config.json and model.safetensors "
                                                   "(or pytorch_model.bin), and its tokenizer files")
    imports.add_argument("--out", type=Path, required=True, help="the checkpoint directory to write (must not exist)")
    exports = commands.add_parser("to-hf", help="a checkpoint as a Hugging Face GPT-2 directory")
    exports.add_argument("checkpoint", type=Path, help="a checkpoint directory (runs/<name>/checkpoints/step_N)")
    exports.add_argument("--out", type=Path, required=True, help="the directory to write (must not exist, or be empty)")
    add_base_argument(exports)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(levelname)s] %(message)s", datefmt="%H:%M:%S")
    source = args.hf_dir if args.command == "from-hf" else args.checkpoint
    try:
        written = from_hf(source, args.out) if args.command == "from-hf" else to_hf(source, args.out, args.base)
    except (ModelLoadError, CheckpointError, HfExportError, OSError) as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 2
    log.info("converted %s to %s", source, written)
    return 0


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split()) or type(err).__name__


if __name__ == "__main__":
    sys.exit(main())
