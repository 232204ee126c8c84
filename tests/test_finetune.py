"""Fine-tuning on the pretraining engine: masked prompts, packed samples, the loss over a global batch's valid
tokens, at every layout, from an imported GPT-2.

The fine-tuning data (`sft_data`, tests/conftest.py) is prepared once per session by `data_pipeline.prepare_sft`
from generated prompt/response records of very different lengths, with the small corpus's tokenizer (512 tokens;
the chat template adds 3).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from data_pipeline.sft_stream import SFTStream
from tests.conftest import SMALL_RUN, compose_config
from tests.test_init_from import hf_gpt2_directory
from tests.test_parallel import (
    CLIP,
    Reference,
    assert_same_curve,
    assert_same_gradients,
    launch_instrumented,
    train_metric,
)
from tests.workers.instruments import first_step_gradients, full_gradients, load_rank_gradients
from trainer.config import KernelsConfig, ModelConfig
from trainer.model import GPT
from trainer.run import run

STEPS = 3
def sft_args(sft_data: Path) -> list[str]:
    return [*SMALL_RUN, CLIP, f"data.prepared_dir={sft_data}", "model.vocab_size=512", "train.eval_interval=0",
            "train.checkpoint_interval=0", f"train.max_steps={STEPS}"]


def test_prepared_data_extends_the_tokenizer(sft_data):
    index = json.loads((sft_data / "index.json").read_text())
    assert index["kind"] == "sft" and index["base_vocab_size"] == 512 and index["vocab_size"] == 515


# ---------------------------------------------------------------------------------------------------------
# The loss, on the model itself


@pytest.fixture
def model(cpu_topology) -> GPT:
    return GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=32), KernelsConfig(attention="reference"),
               515, seed=0)


def gradients_of(model: GPT, inputs, labels) -> dict[str, torch.Tensor]:
    model.zero_grad()
    model(inputs, labels).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def first_batch(sft_data: Path, packing: bool = True, batch: int = 4):
    return next(iter(SFTStream(str(sft_data), "train", 32, batch, seed=0, packing=packing)))


def test_masked_targets_get_no_gradient(model, sft_data):
    ids, targets, mask, segments, positions = first_batch(sft_data)
    inputs, weights = (ids, segments, positions), mask / mask.sum()
    base = gradients_of(model, inputs, (targets, weights))
    masked, trained = (mask == 0).nonzero()[0], mask.nonzero()[0]
    for (row, col), should_change in ((masked.tolist(), False), (trained.tolist(), True)):
        other = targets.clone()
        other[row, col] = (other[row, col] + 1) % 512
        changed = gradients_of(model, inputs, (other, weights))
        differs = any(not torch.equal(changed[n], base[n]) for n in base)
        assert differs == should_change, (row, col, should_change)


def summed_loss_and_gradients(model: GPT, batches) -> tuple[float, dict[str, torch.Tensor]]:
    """The mean loss over every valid token of `batches`, and its gradient."""
    valid = sum(batch.loss_mask.sum() for batch in batches)
    model.zero_grad()
    total = 0.0
    for ids, targets, mask, segments, positions in batches:
        loss = model((ids, segments, positions), (targets, mask / valid))
        loss.backward()
        total += loss.item()
    return total, {name: p.grad.clone() for name, p in model.named_parameters()}


def val_batches(sft_data: Path, packing: bool) -> list:
    return list(SFTStream(str(sft_data), "val", 32, 4, seed=0, shuffle=False, loop=False, packing=packing))


def test_packed_samples_train_as_one_sample_per_sequence(model, sft_data):
    packed, alone = val_batches(sft_data, True), val_batches(sft_data, False)
    assert len(packed) < len(alone)  # packing puts several samples in a row
    assert any(batch.segment_ids.max() > 1 for batch in packed)
    loss_packed, grads_packed = summed_loss_and_gradients(model, packed)
    loss_alone, grads_alone = summed_loss_and_gradients(model, alone)
    assert loss_packed == pytest.approx(loss_alone, rel=1e-5)
    for name, grad in grads_alone.items():
        torch.testing.assert_close(grads_packed[name], grad, rtol=0, atol=1e-5 * grad.abs().max().item(), msg=name)


# ---------------------------------------------------------------------------------------------------------
# Runs on the engine


def reference_run(args: list[str], run_dir: Path, grad_dir: Path) -> Reference:
    config = compose_config([*args, f"train.run_dir={run_dir}"])
    grad_dir.mkdir(parents=True, exist_ok=True)
    with first_step_gradients(grad_dir):
        summary = run(config)
    return Reference(summary.train_losses, train_metric(run_dir, "train/grad_norm"), Path(summary.checkpoint),
                     full_gradients(load_rank_gradients(grad_dir)))


@pytest.fixture(scope="module")
def single(sft_data, tmp_path_factory) -> Reference:
    """One process, 4 micro-batches of 4 per step."""
    return reference_run([*sft_args(sft_data), "train.grad_accum_steps=4"], tmp_path_factory.mktemp("run"),
                         tmp_path_factory.mktemp("grads"))


def test_accumulation_does_not_change_the_gradient(sft_data, single, tmp_path):
    """1 x 16 rows per step equals 4 x 4: every valid token weighs the same, whichever micro-batch holds it."""
    one = reference_run([*sft_args(sft_data), "train.grad_accum_steps=1", "train.micro_batch_size=16"],
                        tmp_path / "run", tmp_path / "grads")
    for name, expected in single.gradients.items():
        torch.testing.assert_close(one.gradients[name], expected, rtol=0, atol=1e-5 * expected.abs().max().item(),
                                   msg=name)
    for step, loss in single.losses.items():
        assert one.losses[step] == pytest.approx(loss, rel=1e-5)


# Packed samples through the pipeline stages and the loss weights over dp replicas; tests/test_lora.py runs the same
# data at tp2-pp2 with sequence parallelism and tp2-dp2 ZeRO-3.
LAYOUTS = {
    "pp2-dp2-zero1": ["parallel.pp=2", "parallel.dp=2", "parallel.zero_stage=1", "train.grad_accum_steps=2"],
}


@pytest.mark.distributed
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layouts_fine_tune_with_the_single_process_gradients_and_curve(layout, sft_data, single, tmp_path):
    args = [*sft_args(sft_data), "train.grad_accum_steps=4", *LAYOUTS[layout], "train.run_name=sft"]
    result = launch_instrumented(4, args, tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert_same_gradients(tmp_path / "grads", single)
    assert_same_curve(tmp_path / "runs" / "sft", single, steps=STEPS)


def test_fine_tuning_an_imported_gpt2_resumes_exactly(small_corpus, sft_data, tmp_path):
    hf = hf_gpt2_directory(tmp_path / "hf", small_corpus / "tokenizer.json")
    args = [*sft_args(sft_data), f"train.init_from={hf}", "train.max_steps=4", "train.checkpoint_interval=2"]
    straight = run(compose_config([*args, f"train.run_dir={tmp_path / 'straight'}"]))
    first = run(compose_config([*args, f"train.run_dir={tmp_path / 'stopped'}", "train.exit_after_steps=2"]))
    assert sorted(first.train_losses) == [1, 2]
    resumed = run(compose_config([*args, f"train.run_dir={tmp_path / 'stopped'}"]))
    assert sorted(resumed.train_losses) == [3, 4]
    assert {**first.train_losses, **resumed.train_losses} == straight.train_losses
