"""Test instruments put around a real training run: the first step's gradients and the activation shapes.

Both patch classes of the running process and leave the training code untouched, so what they record is
what the run computes:
- `first_step_gradients` saves, at the first optimizer step, every parameter's gradient *as the optimizer
  is about to use it* (after the data-parallel reduction, the pipeline's tied-weight sum and ZeRO's
  partitioning, before clipping), gathered over dp with DeepSpeed's `safe_get_full_grad` and named as in
  the single-process GPT; tp shards stay split and are joined by `full_gradients`. Frozen parameters have
  no gradient (asserted) and are left out.
- `activation_shapes` records the shape of every tensor entering a transformer block or a LayerNorm, the
  activations that sequence parallelism splits over tp.
- `nan_gradient_at` puts a NaN into one element of the first parameter's gradient on the first pipeline
  stage at chosen steps, as autograd hands it over and before DeepSpeed reduces or partitions it, so the
  other ranks can learn of it only from the global gradient norm.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from deepspeed.utils import safe_get_full_grad

import trainer.engine
import trainer.model
from trainer.sharded_state import named_parameters, partition_dim


def _save_gradients(ds_engine, engine: trainer.engine.Engine, out_file: Path) -> None:
    """Collective over dp (ZeRO gathers the partitions): every rank of the step must call it."""
    grads, dims = {}, {}
    for name, param in named_parameters(ds_engine, engine.config.model.n_layer, engine.pipeline):
        if not param.requires_grad:  # frozen (the base under LoRA adapters)
            assert param.grad is None, f"frozen parameter {name} has a gradient"
            continue
        grads[name] = safe_get_full_grad(param).detach().float().cpu().clone()
        dims[name] = partition_dim(param)
    topo = engine.topo
    torch.save({"grads": grads, "dims": dims, "tp_rank": topo.tp_rank, "pp_rank": topo.pp_rank,
                "dp_rank": topo.dp_rank}, out_file)


@contextlib.contextmanager
def first_step_gradients(out_dir: Path) -> Iterator[None]:
    """Every Engine built inside saves its first step's gradients to `out_dir/grads-rank{rank}.pt`."""
    original_init = trainer.engine.Engine.__init__

    def init(engine, *args, **kwargs):
        original_init(engine, *args, **kwargs)
        ds_engine = engine.ds
        take_model_step = ds_engine._take_model_step  # DeepSpeed's "clip, then optimizer.step()"

        def capture_then_step(*step_args, **step_kwargs):
            if ds_engine.global_steps == 0:
                _save_gradients(ds_engine, engine, Path(out_dir) / f"grads-rank{engine.topo.rank}.pt")
            return take_model_step(*step_args, **step_kwargs)

        ds_engine._take_model_step = capture_then_step

    trainer.engine.Engine.__init__ = init
    try:
        yield
    finally:
        trainer.engine.Engine.__init__ = original_init


def load_rank_gradients(grad_dir: Path) -> list[dict]:
    """What every rank saved, in rank order."""
    files = sorted(Path(grad_dir).glob("grads-rank*.pt"), key=lambda f: int(f.stem.removeprefix("grads-rank")))
    assert files, f"no gradients saved in {grad_dir}"
    return [torch.load(f, weights_only=True) for f in files]


def full_gradients(saved: list[dict]) -> dict[str, torch.Tensor]:
    """Single-process-shaped gradients: tp shards joined, pipeline stages merged, dp replicas checked equal."""
    by_tp: dict[int, dict[str, torch.Tensor]] = {}
    dims: dict[str, int | None] = {}
    for rank in saved:
        shard = by_tp.setdefault(rank["tp_rank"], {})
        for name, grad in rank["grads"].items():
            if name in shard:  # another dp rank, or the pipeline's second copy of the tied token table
                torch.testing.assert_close(grad, shard[name], rtol=0, atol=0, msg=f"replicas of {name} differ")
            shard[name] = grad
            dims[name] = rank["dims"][name]
    tp = len(by_tp)
    full = {}
    for name, dim in dims.items():
        pieces = [by_tp[t][name] for t in range(tp)]
        if dim is None:
            for piece in pieces[1:]:
                torch.testing.assert_close(piece, pieces[0], rtol=0, atol=0, msg=f"tp replicas of {name} differ")
        full[name] = pieces[0] if dim is None else torch.cat(pieces, dim=dim)
    return full


@contextlib.contextmanager
def activation_shapes(out_file: Path) -> Iterator[None]:
    """Record the shape of each input to `Block.forward` and `LayerNorm.forward` (the residual stream of a
    packed batch's `(h, segment_ids)`); write them as JSON."""
    seen: set[tuple[str, tuple[int, ...]]] = set()
    originals = {cls: cls.forward for cls in (trainer.model.Block, trainer.model.LayerNorm)}

    def recording(cls):
        def forward(module, x, *args, **kwargs):
            seen.add((cls.__name__, tuple((x[0] if isinstance(x, tuple) else x).shape)))
            return originals[cls](module, x, *args, **kwargs)
        return forward

    for cls in originals:
        cls.forward = recording(cls)
    try:
        yield
    finally:
        for cls, forward in originals.items():
            cls.forward = forward
        Path(out_file).write_text(json.dumps(sorted([name, list(shape)] for name, shape in seen)))


def _poisoned(grad: torch.Tensor) -> torch.Tensor:
    grad = grad.clone()
    grad.view(-1)[0] = float("nan")
    return grad


@contextlib.contextmanager
def nan_gradient_at(steps: set[int]) -> Iterator[None]:
    """Every Engine built inside poisons one gradient during the steps in `steps` (counted from 1 per process)."""
    original_init, original_step = trainer.engine.Engine.__init__, trainer.engine.Engine.train_step

    def init(engine, *args, **kwargs):
        original_init(engine, *args, **kwargs)
        engine.steps_begun = 0
        if engine.topo.pp_rank == 0:
            first = next(engine.module.parameters())
            first.register_hook(lambda grad: _poisoned(grad) if engine.steps_begun in steps else grad)

    def train_step(engine, batches):
        engine.steps_begun += 1
        return original_step(engine, batches)

    trainer.engine.Engine.__init__, trainer.engine.Engine.train_step = init, train_step
    try:
        yield
    finally:
        trainer.engine.Engine.__init__, trainer.engine.Engine.train_step = original_init, original_step
