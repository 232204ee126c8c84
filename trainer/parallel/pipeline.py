"""The GPT as a DeepSpeed PipelineModule: the same layers as `trainer.model.GPT`, cut into pp stages.

Layer list: [embedding (tied), block 0 .. block n-1, final norm, output layer (tied)]. The first and
last stages each hold a copy of the token table; DeepSpeed keeps the copies equal by summing their
gradients over the tie group. `canonical_name` maps a stage's parameter names onto the names of the
single-process GPT, so checkpoints do not depend on the layout.
"""

from __future__ import annotations

import re

from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

from trainer.config import Config
from trainer.model import Block, Embedding, FinalNorm, OutputLayer, checkpoint_block, language_model_loss
from trainer.parallel.topology import Topology

TIE_KEY = "embedding"
_LAYER = re.compile(r"^(\d+)\.(.*)$")


def build_pipeline(config: Config, vocab_size: int, topo: Topology) -> PipelineModule:
    """This rank's pipeline stage of the GPT, partitioned as `parallel.pipeline_partition` says."""
    model, kernels, seed = config.model, config.kernels, config.train.seed
    sp = config.parallel.sequence_parallel  # stages then pass this rank's sequence chunk to each other
    layers = [
        TiedLayerSpec(TIE_KEY, Embedding, model, vocab_size, seed, sp, tied_weight_attr=["tokens.weight"]),
        *(LayerSpec(Block, model, kernels, seed, i, sp) for i in range(model.n_layer)),
        LayerSpec(FinalNorm, model, kernels, sp),
        TiedLayerSpec(TIE_KEY, OutputLayer, model, vocab_size, seed, sp, tied_weight_attr=["tokens.weight"]),
    ]
    # Axes (pipe, data, model) with model fastest: the same rank order as megatron-core's groups.
    topology = PipeModelDataParallelTopology(num_pp=topo.pp, num_mp=topo.tp, num_dp=topo.dp)
    return PipelineModule(
        layers=layers,
        topology=topology,
        loss_fn=language_model_loss,
        partition_method=config.parallel.pipeline_partition,
        activation_checkpoint_interval=1 if config.train.activation_checkpointing else 0,
        activation_checkpoint_func=checkpoint_block,
        checkpointable_layers=["Block"],
    )


def canonical_name(name: str, n_layer: int) -> str:
    """A pipeline stage's parameter name as the single-process GPT calls it."""
    if name.startswith(f"tied_modules.{TIE_KEY}."):
        return "embedding." + name[len(f"tied_modules.{TIE_KEY}.") :]
    match = _LAYER.match(name)
    if not match:
        raise KeyError(f"unexpected pipeline parameter name {name!r}")
    index, rest = int(match.group(1)), match.group(2)
    if 1 <= index <= n_layer:
        return f"blocks.{index - 1}.{rest}"
    if index == n_layer + 1:
        return f"head.{rest}"
    raise KeyError(f"pipeline parameter {name!r} does not belong to a block or the final norm")
