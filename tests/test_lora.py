"""LoRA fine-tuning: adapters start at the base model, only they train, tp/pp/ZeRO layouts match one process,
adapter-only checkpoints resume exactly over the right base, and the merged export is the adapted model.

The base is a random transformers GPT-2 of SMALL_RUN's shape (`hf_gpt2_directory`); the data the fine-tuning
tests' prompt/response records (`tests/test_finetune.py`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from data_pipeline.sft_stream import SFTStream
from data_pipeline.shards import read_index
from tests.conftest import compose_config
from tests.test_finetune import reference_run, sft_args
from tests.test_init_from import hf_gpt2_directory
from tests.test_parallel import Reference, assert_same_gradients, launch_instrumented, train_metric
from trainer.checkpoint import CheckpointError, CheckpointReader
from trainer.config import (
    LORA_TARGETS,
    ConfigError,
    HardwareConfig,
    KernelsConfig,
    LoraConfig,
    ModelConfig,
    ParallelConfig,
)
from trainer.convert import main as convert_main
from trainer.cost.memory import Layout, estimate_memory
from trainer.engine import Engine
from trainer.engine import build_model as build_engine_model
from trainer.inference import ModelLoadError, build_model, read_model_weights
from trainer.init_from import initialize_from
from trainer.lora import add_adapters, is_adapter_parameter, merge_adapters
from trainer.model import GPT
from trainer.parallel import init_topology, shutdown_topology
from trainer.run import run

STEPS = 3
RANK = 4
LORA = [f"finetune.lora.rank={RANK}", "finetune.lora.alpha=8", "optim.lr=3e-3"]
SHAPE = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=32)


@pytest.fixture(scope="module")
def base_dir(small_corpus, tmp_path_factory) -> Path:
    return hf_gpt2_directory(tmp_path_factory.mktemp("base"), small_corpus / "tokenizer.json")


def lora_args(sft_data: Path, base: Path) -> list[str]:
    return [*sft_args(sft_data), *LORA, f"train.init_from={base}", "train.grad_accum_steps=4"]


# ---------------------------------------------------------------------------------------------------------
# The adapters on the model itself


def test_adapters_start_at_the_base_model_and_merge_into_its_weights(cpu_topology):
    model = GPT(SHAPE, KernelsConfig(attention="reference"), 100, seed=0)
    ids = torch.randint(0, 100, (2, 16))
    base_logits = model(ids)[..., :100]
    base_weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    add_adapters(model, LoraConfig(rank=RANK, alpha=8.0), SHAPE, seed=0)
    assert torch.equal(model(ids)[..., :100], base_logits)  # B = 0: exactly the base model
    trainable = sorted(name for name, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(f"blocks.{i}.{layer}_lora.{ab}" for i in range(2) for ab in "ab"
                               for layer in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj"))
    for name, param in model.named_parameters():
        if name.endswith("_lora.b"):
            torch.nn.init.normal_(param.data, std=0.2)
    adapted = model(ids)[..., :100]
    assert (adapted - base_logits).abs().max() > 0.1
    adapters = {name: p.detach() for name, p in model.named_parameters() if is_adapter_parameter(name)}
    merged = GPT(SHAPE, KernelsConfig(attention="reference"), 100, seed=0)
    for name, value in merge_adapters(base_weights, adapters, scale=8.0 / RANK).items():
        merged.get_parameter(name).data.copy_(value)
    torch.testing.assert_close(merged(ids)[..., :100], adapted, rtol=0, atol=1e-5)


def test_adapters_need_a_base_model(sft_data, tmp_path):
    with pytest.raises(ConfigError, match="finetune.lora.rank=4: adapters fine-tune a base model: set train.init_from"):
        run(compose_config([*sft_args(sft_data), *LORA, f"train.run_dir={tmp_path}"]))
    with pytest.raises(ConfigError, match=r"finetune.lora.targets=.*unknown layers \['wte'\]"):
        compose_config([*sft_args(sft_data), "finetune.lora.targets=[qkv,wte]", "train.run_dir=."])


@pytest.fixture
def topology():
    """This test's own groups: a `run()` in an earlier test of the module tore down the module's."""
    yield init_topology(ParallelConfig(), "cpu")
    shutdown_topology()


def test_training_changes_the_adapters_alone(sft_data, base_dir, topology, tmp_path):
    config = compose_config([*lora_args(sft_data, base_dir), f"train.run_dir={tmp_path}"])
    index = read_index(sft_data)
    engine = Engine(build_engine_model(config, index["vocab_size"], topology), config, topology)
    initialize_from(config, engine, index)
    before = {name: p.detach().clone() for name, p in engine.module.named_parameters()}
    batches = SFTStream(str(sft_data), "train", 32, 4, seed=0)
    for _ in range(2):  # B moves at step 1, A (whose gradient is B's product) from step 2
        engine.train_step(batches)
    changed = {name for name, p in engine.module.named_parameters() if not torch.equal(p, before[name])}
    assert changed == {name for name in before if is_adapter_parameter(name)}


# ---------------------------------------------------------------------------------------------------------
# Runs on the engine


@pytest.fixture(scope="module")
def single(sft_data, base_dir, tmp_path_factory) -> Reference:
    """One process: LoRA over the base, 4 micro-batches of 4 per step, checkpoints at steps 2 and 3."""
    return reference_run([*lora_args(sft_data, base_dir), "train.checkpoint_interval=2"],
                         tmp_path_factory.mktemp("lora-run"), tmp_path_factory.mktemp("lora-grads"))


def resume_args(sft_data: Path, base: Path, single: Reference) -> list[str]:
    """Step 3 again, resumed from the single run's step-2 checkpoint: A and B both have gradients by then (at
    step 1, B = 0 gives A none)."""
    return [*lora_args(sft_data, base), f"train.resume={single.checkpoint.parent / 'step_00000002'}"]


@pytest.fixture(scope="module")
def resumed_single(sft_data, base_dir, single, tmp_path_factory) -> Reference:
    return reference_run(resume_args(sft_data, base_dir, single), tmp_path_factory.mktemp("lora-resumed"),
                         tmp_path_factory.mktemp("lora-resumed-grads"))


def adapter_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    reader = CheckpointReader(checkpoint)
    return {name: reader.read(name) for name in reader.parameter_names()}


def test_only_the_adapters_train_and_the_checkpoint_holds_them_alone(single, base_dir):
    assert sorted(single.gradients) == sorted(adapter_weights(single.checkpoint))  # frozen: no gradient at all
    assert all(g.abs().max() == 0 for name, g in single.gradients.items() if name.endswith(".a"))  # B = 0 at step 1
    assert all(is_adapter_parameter(name) for name in single.gradients)
    assert any(g.abs().max() > 0 for name, g in single.gradients.items() if name.endswith(".b"))
    state = json.loads((single.checkpoint / "trainer_state.json").read_text())
    assert state["adapters"]["base"] == str(base_dir) and state["adapters"]["rank"] == RANK
    saved = load_file(single.checkpoint / "model-tp00-pp00.safetensors")
    assert all(is_adapter_parameter(name) for name in saved)
    moments = load_file(single.checkpoint / "optim-tp00-pp00.safetensors")
    assert sorted(moments) == sorted(f"{kind}/{name}" for name in saved for kind in ("exp_avg", "exp_avg_sq"))
    assert single.losses[STEPS] < single.losses[1]


# Sequence parallelism with megatron's buffers pointed at the CPU (see tests/workers/pretrain.py).
SEQUENCE_PARALLEL_ON_CPU = ("parallel.sequence_parallel=true", "--sequence-parallel-on-cpu")
LAYOUTS = {
    "tp2-pp2-sp": ["parallel.tp=2", "parallel.pp=2", *SEQUENCE_PARALLEL_ON_CPU],
    "tp2-dp2-zero3": ["parallel.tp=2", "parallel.dp=2", "parallel.zero_stage=3", "train.grad_accum_steps=2"],
}


@pytest.mark.distributed
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layouts_train_the_adapters_as_one_process_does(layout, sft_data, base_dir, single, resumed_single, tmp_path):
    """Resumed at another layout from the single run's step 2: step 3's gradient of every adapter, its loss and
    norm, and the adapters it ends with.

    The adapters after the step may differ by 1e-4 of their largest element: Adam divides each element's update by
    the root of its second moment, which magnifies last-bit differences of elements whose gradients are near zero.
    """
    flags = [arg for arg in LAYOUTS[layout] if arg.startswith("--")]
    overrides = [arg for arg in LAYOUTS[layout] if arg not in flags]
    args = [*resume_args(sft_data, base_dir, single), *overrides, "train.run_name=lora"]
    result = launch_instrumented(4, args, tmp_path, *flags)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert_same_gradients(tmp_path / "grads", resumed_single)
    assert all(gradient.abs().max() > 0 for gradient in resumed_single.gradients.values())
    run_dir = tmp_path / "runs" / "lora"
    assert train_metric(run_dir) == pytest.approx(resumed_single.losses, rel=1e-5)
    assert train_metric(run_dir, "train/grad_norm") == pytest.approx(resumed_single.grad_norms, rel=1e-4)
    expected = adapter_weights(single.checkpoint)
    got = adapter_weights(sorted((run_dir / "checkpoints").glob("step_*"))[-1])
    assert sorted(got) == sorted(expected)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=1e-4 * value.abs().max().item(), msg=name)


def test_adapters_resume_exactly_and_only_over_their_base(sft_data, base_dir, small_corpus, tmp_path):
    args = [*lora_args(sft_data, base_dir), "train.max_steps=4", "train.checkpoint_interval=2"]
    straight = run(compose_config([*args, f"train.run_dir={tmp_path / 'straight'}"]))
    first = run(compose_config([*args, f"train.run_dir={tmp_path / 'stopped'}", "train.exit_after_steps=2"]))
    other_base = hf_gpt2_directory(tmp_path / "other", small_corpus / "tokenizer.json", seed=8)
    with pytest.raises(CheckpointError, match=f"trained over the weights of {base_dir}.*train.init_from={other_base} "
                                              "holds other weights"):
        run(compose_config([*args, f"train.run_dir={tmp_path / 'stopped'}", f"train.init_from={other_base}"]))
    with pytest.raises(CheckpointError, match=r"finetune.lora.rank=4 \(this run: 0\)"):
        run(compose_config([*sft_args(sft_data), f"train.init_from={base_dir}", "train.max_steps=4",
                            f"train.run_dir={tmp_path / 'stopped'}"]))
    resumed = run(compose_config([*args, f"train.run_dir={tmp_path / 'stopped'}"]))
    assert sorted(first.train_losses) == [1, 2] and sorted(resumed.train_losses) == [3, 4]
    assert {**first.train_losses, **resumed.train_losses} == straight.train_losses


def test_merged_export_is_the_adapted_model(single, base_dir, tmp_path):
    """The checkpoint's adapters on the base (as training computes them) give the logits of the merged weights,
    in our loader and in transformers after `convert to-hf`."""
    from transformers import GPT2LMHeadModel

    adapted = GPT(SHAPE, KernelsConfig(attention="reference"), 515, seed=0)
    base = read_model_weights(base_dir)
    add_adapters(adapted, LoraConfig(rank=RANK, alpha=8.0), SHAPE, seed=0)
    values = {**base.weights, **adapter_weights(single.checkpoint)}
    for name, param in adapted.named_parameters():
        value = values[name]
        param.data.copy_(torch.cat([value, value.new_zeros(param.shape[0] - value.shape[0], *value.shape[1:])])
                         if value.shape != param.shape else value)
    ids = torch.randint(0, 512, (2, 24))
    expected = adapted(ids)[..., :515]
    merged = build_model(read_model_weights(single.checkpoint, base=base_dir))
    torch.testing.assert_close(merged(ids)[..., :515], expected, rtol=0, atol=1e-5)
    assert (expected[..., :512] - build_model(base)(ids)[..., :512]).abs().max() > 1e-3  # the adapters matter
    assert convert_main(["to-hf", str(single.checkpoint), "--out", str(tmp_path / "hf"), "--base", str(base_dir)]) == 0
    hf_logits = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()(ids).logits.detach()
    torch.testing.assert_close(hf_logits[..., :515], expected, rtol=0, atol=1e-4)


def test_an_adapter_checkpoint_names_its_base(single, base_dir, small_corpus, tmp_path):
    with pytest.raises(ModelLoadError, match=f"holds LoRA adapters \\(rank 4\\) trained over {base_dir}: name that "
                                             f"base model with --base {base_dir}"):
        read_model_weights(single.checkpoint)
    other = hf_gpt2_directory(tmp_path / "other", small_corpus / "tokenizer.json", seed=8)
    with pytest.raises(ModelLoadError, match=f"--base {other}: not the weights the adapters .* were trained over"):
        read_model_weights(single.checkpoint, base=other)


def test_the_memory_estimate_holds_optimizer_state_for_the_adapters_alone(single):
    records = [json.loads(line) for line in (single.checkpoint.parent.parent / "metrics.jsonl").read_text().splitlines()]
    measured = records[-1]["summary"]["memory_per_rank"][0]
    full = Layout(micro_batch=4, seq_len=32, precision="fp32", micro_batches=4)
    lora = dataclasses.replace(full, lora_rank=RANK, lora_targets=LORA_TARGETS)
    estimate = estimate_memory(SHAPE, 515, lora, HardwareConfig())
    assert estimate.params / 2**20 == pytest.approx(measured["params_mb"], rel=0.01)
    assert estimate.optimizer / 2**20 == pytest.approx(measured["optimizer_mb"], rel=0.01)  # Adam's m and v
    adapters = 2 * RANK * (8 * SHAPE.n_embd + 2 * SHAPE.ffn_size)  # 2 blocks of A and B: r(4d + 2d + d+f + f+d)
    assert estimate.optimizer == 8 * adapters
    assert estimate.optimizer < estimate_memory(SHAPE, 515, full, HardwareConfig()).optimizer / 10
