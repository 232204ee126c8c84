"""`run(config)`: one training run, wired in a fixed order.

Preemption handlers, topology, memory check, data, model, engine, resume, step loop, final checkpoint and
report. Fine-tuning reuses the same engine and loop with other data.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from data_pipeline.config import parse_mixture
from data_pipeline.mixture import MixtureStream
from data_pipeline.prepare import ensure_prepared
from data_pipeline.sft_stream import SFTStream, sft_eval_batches
from data_pipeline.shards import read_index
from data_pipeline.stream import StreamLoader, TokenStream, eval_batches
from launch.rendezvous import slurm_job_text
from trainer.checkpoint import (
    STATE_FILE,
    CheckpointError,
    CheckpointReader,
    TrainerState,
    resolve_resume,
    save_checkpoint,
)
from trainer.config import Config, ConfigError
from trainer.cost import model_flops_per_token
from trainer.cost.flops import hardware_flops_per_token
from trainer.cost.memory import Layout, estimate_memory
from trainer.cost.reconcile import Plan, Reconciler
from trainer.engine import Engine, build_model, resolve_precision
from trainer.hardware import resolve_hardware, run_peak
from trainer.init_from import check_adapter_base, initialize_from
from trainer.loop import LoopResult, Progress, train_loop
from trainer.memory import gather_rank_memory
from trainer.metrics import MetricsSink
from trainer.parallel import Topology, init_topology, shutdown_topology
from trainer.preemption import Preempted, PreemptionWatch
from trainer.vocab import padded_vocab_size

log = logging.getLogger(__name__)
MiB = 2**20
GiB = 2**30


@dataclass
class RunSummary:
    """The figures a run ends with (this process's view; losses are averaged over dp)."""

    final_step: int
    train_loss: float
    val_loss: float
    unigram_entropy: float
    checkpoint: str | None  # None: train.final_checkpoint=false
    tokens_seen: int
    tokens_trained: int
    flops: float
    train_seconds: float
    num_parameters: int
    train_losses: dict[int, float] = field(default_factory=dict)
    val_losses: dict[int, float] = field(default_factory=dict)
    memory_per_rank: list[dict[str, float]] = field(default_factory=list)

    @property
    def seconds_per_step(self) -> float:
        return self.train_seconds / max(1, len(self.train_losses))

    @property
    def flops_per_second(self) -> float:
        return self.flops / max(self.train_seconds, 1e-9)


def global_parameter_count(module: torch.nn.Module, topo: Topology) -> int:
    """Parameters of the whole model: tp shards summed, replicas (tp copies, tied pipeline copies) once."""
    local = 0
    for param in module.parameters():
        replica = not getattr(param, "tensor_model_parallel", False) and topo.tp_rank != 0
        if replica or getattr(param, "ds_pipe_replicated", False):
            continue
        local += getattr(param, "ds_numel", param.numel())
    total = torch.tensor(float(local))
    if topo.world_size > 1:
        dist.all_reduce(total)
    return int(total.item()) // topo.dp


def _prepare_data(config: Config, topo: Topology) -> dict:
    """Rank 0 prepares the corpus if needed; every rank then reads the same index."""
    if topo.is_main:
        ensure_prepared(config.data)
    if dist.get_world_size() > 1:
        dist.barrier()
    return read_index(config.data.prepared_dir)


def build_train_stream(config: Config, topo: Topology, index: dict):
    """The training batches: one corpus or a weighted mixture, read in-process or by DataLoader workers."""

    def loader(prepared_dir: str) -> StreamLoader:
        tokens = TokenStream(
            prepared_dir, "train", config.seq_len, config.train.micro_batch_size, seed=config.data.seed,
            dp_rank=topo.dp_rank, dp_world_size=topo.dp, shuffle_block_shards=config.data.shuffle_block_shards,
            split_mode=config.data.split, num_workers=config.data.num_workers,
        )
        return StreamLoader(tokens, pin_memory=topo.device.type == "cuda")

    if index.get("kind") == "sft":
        return SFTStream(config.data.prepared_dir, "train", config.seq_len, config.train.micro_batch_size,
                         seed=config.data.seed, dp_rank=topo.dp_rank, dp_world_size=topo.dp,
                         packing=config.data.packing)
    mixture = parse_mixture(config.data.mixture)
    if not mixture:
        return loader(config.data.prepared_dir)
    for path, _ in mixture:
        other = read_index(path)
        if (other["vocab_size"], other["eot_id"]) != (index["vocab_size"], index["eot_id"]):
            raise ConfigError(f"data.mixture: {path} was tokenized differently from {config.data.prepared_dir}")
    # Each component has its own data.num_workers DataLoader workers.
    return MixtureStream([loader(p) for p, _ in mixture], [w for _, w in mixture], seed=config.data.seed)


def tokenizer_text(config: Config, index: dict) -> str:
    """The tokenizer.json of the prepared corpus, saved with every checkpoint."""
    return (Path(config.data.prepared_dir) / index["tokenizer"]).read_text(encoding="utf-8")


def check_vocabulary(config: Config, index: dict) -> None:
    """The model preset fixes the vocabulary: refuse data tokenized to another size, naming both.

    Fine-tuning data may extend it: its tokenizer is the model's plus its chat template's special tokens
    (`base_vocab_size` in its index), and the token table grows to hold them."""
    model, data = config.model, config.data
    if model.vocab_size in (index["vocab_size"], index.get("base_vocab_size")):
        return
    origin = f"data.tokenizer_path={data.tokenizer_path}" if data.tokenizer_path else \
        f"the tokenizer trained for data.prepared_dir={data.prepared_dir}"
    raise ConfigError(
        f"model.vocab_size={model.vocab_size} (model={model.name}) but {origin} has {index['vocab_size']} tokens: "
        f"set data.tokenizer_path to a tokenizer of {model.vocab_size} tokens (`python -m trainer.convert from-hf` "
        f"writes GPT-2's), or model.vocab_size={index['vocab_size']}"
    )


def with_epochs(config: Config, index: dict) -> Config:
    """The config with train.max_steps = the steps train.epochs passes over the SFT train split take
    (SFTStream's row plan, the last step rounded up); unchanged when train.epochs is not set."""
    train = config.train
    if train.epochs is None:
        return config
    if index.get("kind") != "sft":
        raise ConfigError(f"train.epochs={train.epochs}: counts passes over fine-tuning data, and "
                          f"data.prepared_dir={config.data.prepared_dir} holds pretraining data: set train.max_steps "
                          "instead (and train.epochs=null)")
    stream = SFTStream(config.data.prepared_dir, "train", config.seq_len, train.micro_batch_size,
                       seed=config.data.seed, packing=config.data.packing)
    rows = stream.rows_in_epochs(train.epochs)
    rows_per_step = train.micro_batch_size * train.grad_accum_steps * config.parallel.dp
    max_steps = -(-rows // rows_per_step)
    if config.optim.warmup_steps > max_steps:
        raise ConfigError(f"optim.warmup_steps={config.optim.warmup_steps}: must be <= the {max_steps} steps of "
                          f"train.epochs={train.epochs} ({rows:,} rows, {rows_per_step} per step)")
    log.info("train.epochs=%d: %s rows of %d tokens, %d per step: train.max_steps=%d", train.epochs, f"{rows:,}",
             config.seq_len, rows_per_step, max_steps)
    return dataclasses.replace(config, train=dataclasses.replace(train, max_steps=max_steps))


def _check_resumable(saved: TrainerState, config: Config, path: Path) -> None:
    """Refuse a checkpoint of another model, naming the differences (the layout may differ)."""
    saved_model = saved.config.get("model")
    if not isinstance(saved_model, dict):
        raise CheckpointError(f"{path / STATE_FILE}: its config has no 'model' section")
    current = dataclasses.asdict(config.model)
    diffs = [
        f"model.{key}={saved_model.get(key)!r} (this run: {value!r})"
        for key, value in current.items()
        if saved_model.get(key) != value and key != "name"
    ]
    saved_lora = saved.config.get("finetune", {}).get("lora", {}).get("rank", 0)
    if saved_lora != config.finetune.lora.rank:
        diffs.append(f"finetune.lora.rank={saved_lora!r} (this run: {config.finetune.lora.rank!r})")
    if diffs:
        raise CheckpointError(
            f"{path} was saved with " + "; ".join(diffs) + ". Use another train.run_name for a new run."
        )


def _agreed_resume_path(resume: str, root: Path, topo: Topology) -> Path | None:
    """Rank 0 picks and checks the checkpoint (reading it once, not once per rank); every rank gets its answer,
    or raises its error."""
    answer: list = [None]
    if topo.is_main:
        try:
            path = resolve_resume(resume, root)
            answer = [("ok", None if path is None else str(path))]
        except CheckpointError as err:
            answer = [("error", str(err))]
    if topo.world_size > 1:
        dist.broadcast_object_list(answer, src=0)
    kind, value = answer[0]
    if kind == "error":
        raise CheckpointError(value)
    return None if value is None else Path(value)


def _resume(config: Config, topo: Topology, engine: Engine, stream, root: Path) -> tuple[Progress, Path | None]:
    """Load the checkpoint train.resume names (if any): the progress it holds, and its path."""
    path = _agreed_resume_path(config.train.resume, root, topo)
    if path is None:
        return Progress(), None
    reader = CheckpointReader(path)
    saved = reader.state
    if saved.weights_only:
        raise CheckpointError(f"train.resume={config.train.resume!r}: {path} holds weights only (an imported model), "
                              f"nothing to resume; start a run from it with train.init_from={path}")
    _check_resumable(saved, config, path)
    if saved.adapters is not None:
        check_adapter_base(saved.adapters, engine.adapters, path)
    engine.load_full_state(reader)
    if not reader.restore_rng(topo):
        log.info("resuming at layout %s from %s: random generators start fresh", topo.layout, saved.layout)
    try:
        stream.load_state_dict(reader.data_state())
    except ValueError as err:
        raise CheckpointError(f"{path}: its data position does not fit this run's data ({err})") from None
    log.info("resumed from %s (step %d, %s tokens seen, saved at layout %s)", path, saved.step,
             f"{saved.tokens_seen:,}", saved.layout)
    return Progress(step=saved.step, tokens_seen=saved.tokens_seen), path


def _checkpoint_saver(config: Config, topo: Topology, engine: Engine, stream, root: Path, tokenizer_json: str,
                      vocab_size: int):
    def save(progress: Progress) -> Path:
        state = TrainerState(
            step=progress.step,
            tokens_seen=progress.tokens_seen,
            layout=topo.layout,
            config=dataclasses.asdict(config),
            vocab_size=vocab_size,
            adapters=engine.adapters.as_dict() if engine.adapters else None,
        )
        path = save_checkpoint(
            root, state, engine.shard_state(), stream.state_dict(), topo, config.train.keep_last_checkpoints,
            tokenizer_json,
        )
        log.info("checkpoint saved: %s", path)
        return path

    return save


def run(config: Config, preemption: PreemptionWatch | None = None) -> RunSummary:
    """Pretrain as configured; returns the summary that is also printed and sent to W&B.

    The preemption handlers go in first (the caller's, installed even earlier, or our own) and stay until the
    run is over: a signal at any point of it ends in a clean stop, never in the signal's default action.
    """
    watch = preemption or PreemptionWatch(config.train.preemption_signals)
    try:
        topo = init_topology(config.parallel, config.train.device, config.cluster.collective_timeout_s)
        watch.device = topo.device
        try:
            return _run(config, topo, watch)
        finally:
            shutdown_topology()
    finally:
        if preemption is None:
            watch.close()


def _run(config: Config, topo: Topology, preemption: PreemptionWatch) -> RunSummary:
    """Start-up up to the model and the data stream, then `_train`."""
    if not topo.is_main:  # one voice per job: other ranks report only warnings and errors
        logging.getLogger().setLevel(logging.WARNING)
    if job := slurm_job_text():
        log.info("%s", job)
    config = with_hardware(config, topo)  # before anything reads config.hardware
    # Before the data is prepared and the model allocated.
    if config.finetune.lora.enabled and not config.train.init_from:
        raise ConfigError(f"finetune.lora.rank={config.finetune.lora.rank}: adapters fine-tune a base model: set "
                          "train.init_from to its checkpoint or Hugging Face directory")
    check_memory(config, topo, config.model.vocab_size)
    torch.manual_seed(config.train.seed)
    Path(config.train.run_dir).mkdir(parents=True, exist_ok=True)
    index = _prepare_data(config, topo)
    check_vocabulary(config, index)
    config = with_epochs(config, index)  # before anything reads train.max_steps
    _stop_if_preempted(preemption, Progress(), None)  # a safe point before the model is built
    engine = Engine(build_model(config, index["vocab_size"], topo), config, topo)
    stream = build_train_stream(config, topo, index)
    try:
        return _train(config, topo, index, engine, stream, preemption)
    finally:
        if hasattr(stream, "close"):
            stream.close()  # stop DataLoader workers


def _stop_if_preempted(preemption: PreemptionWatch, progress: Progress, checkpoint: Path | None) -> None:
    """A safe point of start-up: stop if any rank got a preemption signal (nothing new to save yet)."""
    if preemption.requested():
        raise Preempted(preemption.received, progress.step, None if checkpoint is None else str(checkpoint))


def _train(config: Config, topo: Topology, index: dict, engine: Engine, stream,
           preemption: PreemptionWatch) -> RunSummary:
    """Resume, train, write the final checkpoint, report."""
    read_val = sft_eval_batches if index.get("kind") == "sft" else eval_batches
    val = read_val(config.data.prepared_dir, config.seq_len, config.train.micro_batch_size, config.train.eval_batches)
    run_dir = Path(config.train.run_dir)
    root = run_dir / "checkpoints"
    lora = config.finetune.lora.enabled
    if lora:  # the frozen base under the adapters, whether they start fresh or resume
        initialize_from(config, engine, index)
    progress, resumed = _resume(config, topo, engine, stream, root)
    if resumed is None and config.train.init_from and not lora:
        initialize_from(config, engine, index)
    elif config.train.init_from and not lora:
        log.info("train.init_from=%s not used: the run continues from its own checkpoint", config.train.init_from)
    _stop_if_preempted(preemption, progress, resumed)  # the last safe point before training
    save = _checkpoint_saver(config, topo, engine, stream, root, tokenizer_text(config, index), index["vocab_size"])
    padded_vocab = padded_vocab_size(index["vocab_size"], config.model.pad_vocab_to_multiple, topo.tp)
    flops_per_token = model_flops_per_token(config.model, padded_vocab, config.seq_len)
    num_parameters = global_parameter_count(engine.module, topo)
    sink = MetricsSink(run_dir, config.logging, config.train.run_name, dataclasses.asdict(config), topo.is_main,
                       resumed_at=progress.step)
    log.info("%s; model %s: %s parameters; %s tokens per step on %s (%s)", topo.describe(), config.model.name,
             f"{num_parameters:,}", f"{config.tokens_per_step:,}", topo.device, engine.precision)
    try:
        plan = build_plan(config, topo, padded_vocab, flops_per_token, engine.precision)
        reconciler = Reconciler(plan, config.cost.gap_margin)
        result = train_loop(engine, stream, val, config, topo, progress, save, sink, flops_per_token,
                            reconciler, preemption)
        checkpoint = _final_checkpoint(config, progress, result, save)
        if result.preempted_by:  # the machines are going: no final evaluation, straight out
            raise Preempted(result.preempted_by, progress.step, str(checkpoint))
        if not result.val_losses:  # nothing trained (already finished): still report where the model is
            result.val_losses[progress.step] = engine.evaluate(val)
        summary = _summarise(progress, result, index, checkpoint, flops_per_token, num_parameters)
        summary.memory_per_rank = gather_rank_memory(engine.ds, topo.device)
        sink.summary({k: v for k, v in dataclasses.asdict(summary).items() if not isinstance(v, dict)}
                     | {"seconds_per_step": summary.seconds_per_step})
    finally:
        sink.close()
    _report(summary, topo)
    if topo.is_main:
        _report_plan(reconciler, summary, config, topo, padded_vocab, run_dir, engine.precision)
    return summary


def _final_checkpoint(config: Config, progress: Progress, result: LoopResult, save) -> Path | None:
    """The checkpoint the run ends with; none with train.final_checkpoint=false, unless it was preempted."""
    if config.train.final_checkpoint or result.preempted_by:
        return save(progress)  # the handlers are still in: a signal now is noted, not fatal
    log.info("no final checkpoint (train.final_checkpoint=false)")
    return None


def memory_layout(config: Config, topo: Topology, precision: str) -> Layout:
    """The run's layout as the cost model's memory estimate takes it."""
    return Layout(tp=topo.tp, pp=topo.pp, dp=topo.dp, zero_stage=config.parallel.zero_stage,
                  micro_batch=config.train.micro_batch_size, seq_len=config.seq_len,
                  recompute=config.train.activation_checkpointing, precision="bf16" if precision != "fp32" else "fp32",
                  micro_batches=config.train.grad_accum_steps, lora_rank=config.finetune.lora.rank,
                  lora_targets=tuple(config.finetune.lora.targets))


def check_memory(config: Config, topo: Topology, vocab_size: int) -> None:
    """Refuse, before allocating anything, a model whose estimated memory per rank exceeds the device's."""
    precision = resolve_precision(config.train.precision, topo.device)
    estimate = estimate_memory(config.model, vocab_size, memory_layout(config, topo, precision), config.hardware)
    available, device = device_memory(topo.device)
    if estimate.total > available:
        model = config.model
        raise ConfigError(
            f"model.n_layer={model.n_layer} model.n_embd={model.n_embd}: needs at least {estimate.total / GiB:,.1f} "
            f"GiB per rank by the cost model's estimate ({estimate.model_states / GiB:,.1f} GiB parameters, "
            f"gradients and optimizer state at {precision}, {estimate.activations / GiB:,.1f} GiB activations), "
            f"more than the {available / GiB:,.1f} GiB {device}; choose a smaller model or split it "
            "(parallel.tp, parallel.pp, parallel.zero_stage)"
        )


def device_memory(device: torch.device) -> tuple[float, str]:
    """Bytes one rank may use, and what they are: the GPU's memory, or this node's available RAM shared by its
    ranks."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return float(props.total_memory), f"of {props.name} memory"
    import psutil

    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    share = f" / {local_ranks} ranks" if local_ranks > 1 else ""
    return psutil.virtual_memory().available / local_ranks, f"of available RAM{share}"


def _summarise(progress: Progress, result: LoopResult, index: dict, checkpoint: Path | None,
               flops_per_token: float, num_parameters: int) -> RunSummary:
    last_train = result.train_losses[max(result.train_losses)] if result.train_losses else float("nan")
    return RunSummary(
        final_step=progress.step,
        train_loss=last_train,
        val_loss=result.val_losses[max(result.val_losses)],
        unigram_entropy=index.get("train_unigram_entropy_nats", float("nan")),
        checkpoint=str(checkpoint) if checkpoint else None,
        tokens_seen=progress.tokens_seen,
        tokens_trained=result.tokens_trained,
        flops=result.tokens_trained * flops_per_token,
        train_seconds=result.train_seconds,
        num_parameters=num_parameters,
        train_losses=result.train_losses,
        val_losses=result.val_losses,
    )


def with_hardware(config: Config, topo: Topology) -> Config:
    """The config with `hardware=auto` (or a preset with no GPU peak, on a GPU) resolved for this device; logs
    which preset and the peak MFU will be taken against, measuring it now if it must be measured (cached for the
    plan), before the model takes the device's memory."""
    hardware, why = resolve_hardware(config.hardware, topo.device)
    peak, source = run_peak(hardware, topo.device, resolve_precision(config.train.precision, topo.device))
    if topo.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(topo.device)  # a probe's matrices are not the run's memory
    log.info("%s; MFU against %s, %.4g TFLOP/s", why, source, peak / 1e12)
    return dataclasses.replace(config, hardware=hardware)


def build_plan(config: Config, topo: Topology, padded_vocab: int, flops_per_token: float, precision: str) -> Plan:
    """The run's plan: its token budget at cost.assumed_mfu of the hardware's peak in the run's precision (the
    preset's, else measured on the device)."""
    peak, source = run_peak(config.hardware, topo.device, precision)
    return Plan(
        devices=topo.world_size, peak_flops=peak, peak_source=source, assumed_mfu=config.cost.assumed_mfu,
        flops_per_token=flops_per_token,
        hardware_flops_per_token=hardware_flops_per_token(config.model, padded_vocab, config.seq_len,
                                                          config.train.activation_checkpointing),
        token_budget=config.cost.token_budget or config.train.max_steps * config.tokens_per_step,
        price_per_hour=config.hardware.price_per_hour,
    )


def _report_plan(reconciler: Reconciler, summary: RunSummary, config: Config, topo: Topology,
                 padded_vocab: int, run_dir: Path, precision: str) -> None:
    """Planned versus measured: the table, the cost plot, and estimated versus measured memory."""
    if reconciler.history:
        log.info("plan vs measured (%d x %s):\n%s", reconciler.plan.devices, reconciler.plan.peak_source,
                 reconciler.summary())
        plot = reconciler.plot(run_dir / "cost.png")
        if plot:
            log.info("cost plot: %s", plot)
    estimate = estimate_memory(config.model, padded_vocab, memory_layout(config, topo, precision), config.hardware)
    measured = max(summary.memory_per_rank, key=lambda m: m["params_mb"] + m["optimizer_mb"])
    log.info("memory per rank: estimated %.1f MiB parameters + %.1f MiB optimizer state, measured %.1f + %.1f MiB",
             estimate.params / MiB, estimate.optimizer / MiB, measured["params_mb"], measured["optimizer_mb"])
    peak = max(summary.memory_per_rank, key=lambda m: m.get("device_peak_mb", m["peak_rss_mb"]))
    what = "device peak (max allocated)" if "device_peak_mb" in peak else "process peak RSS (libraries included)"
    log.info("memory per rank: estimated %.1f MiB in all (states %.1f + gradients %.1f + activations %.1f), "
             "measured %s %.0f MiB", estimate.total / MiB, estimate.model_states / MiB - estimate.grads / MiB,
             estimate.grads / MiB, estimate.activations / MiB, what,
             peak.get("device_peak_mb", peak["peak_rss_mb"]))


def _report(summary: RunSummary, topo: Topology) -> None:
    if not topo.is_main:
        return
    log.info("done at step %d: train loss %.4f | val loss %.4f | unigram entropy of the corpus %.4f nats/token",
             summary.final_step, summary.train_loss, summary.val_loss, summary.unigram_entropy)
    log.info("checkpoint: %s", summary.checkpoint)
    log.info("cost: %s tokens this run (%s in all), %.3g model FLOPs in %.1f s of training = %.3g FLOP/s achieved",
             f"{summary.tokens_trained:,}", f"{summary.tokens_seen:,}", summary.flops, summary.train_seconds,
             summary.flops_per_second)
    peak = max(summary.memory_per_rank, key=lambda m: m["peak_rss_mb"])
    log.info("memory: %.3f s/step; largest rank: %.0f MiB peak RSS, %.1f MiB parameters, %.1f MiB optimizer state",
             summary.seconds_per_step, peak["peak_rss_mb"], peak["params_mb"], peak["optimizer_mb"])
