"""Start from GPT-2: a transformers GPT-2 directory trains at tp=2 and pp=2 as in one process, and its checkpoints
of either layout generate the same text and export back to transformers.

The Hugging Face model is random (built from a `GPT2Config`, no download) and shares the small corpus's
tokenizer, so the prepared data fits it as GPT-2's tokenizer fits a corpus prepared with it.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import SMALL_RUN, compose_config
from tests.test_parallel import (
    Reference,
    _data_args,
    assert_same_curve,
    assert_same_gradients,
    launch_instrumented,
    train_metric,
)
from tests.workers.instruments import first_step_gradients, full_gradients, load_rank_gradients
from trainer.run import run

pytestmark = pytest.mark.distributed
STEPS = 3
LR = 1e-3


def hf_gpt2_directory(out: Path, tokenizer_file: Path, seed: int = 7) -> Path:
    """A random transformers GPT-2 the size of SMALL_RUN's model, saved with `save_pretrained` and a tokenizer."""
    from tokenizers import Tokenizer
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    eot = tokenizer.token_to_id("<|endoftext|>")
    config = GPT2Config(vocab_size=tokenizer.get_vocab_size(), n_positions=32, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=eot, eos_token_id=eot)
    torch.manual_seed(seed)
    GPT2LMHeadModel(config).save_pretrained(out)
    shutil.copy(tokenizer_file, out / "tokenizer.json")
    return out


@pytest.fixture(scope="module")
def hf_dir(small_corpus, tmp_path_factory) -> Path:
    return hf_gpt2_directory(tmp_path_factory.mktemp("hf-gpt2"), small_corpus / "tokenizer.json")


def run_args(small_corpus, hf_dir: Path) -> list[str]:
    return [*SMALL_RUN, *_data_args(small_corpus), f"train.init_from={hf_dir}", f"train.max_steps={STEPS}",
            f"optim.lr={LR}", "train.grad_accum_steps=4", "train.eval_interval=0", "train.checkpoint_interval=0"]


@pytest.fixture(scope="module")
def single(small_corpus, hf_dir, tmp_path_factory) -> Reference:
    """One process started from the Hugging Face directory."""
    run_dir, grad_dir = tmp_path_factory.mktemp("single"), tmp_path_factory.mktemp("single-grads")
    config = compose_config([*run_args(small_corpus, hf_dir), f"train.run_dir={run_dir}"])
    with first_step_gradients(grad_dir):
        summary = run(config)
    return Reference(summary.train_losses, train_metric(run_dir, "train/grad_norm"), Path(summary.checkpoint),
                     full_gradients(load_rank_gradients(grad_dir)))


def test_training_starts_from_the_imported_weights(single, hf_dir):
    """After STEPS Adam steps of at most ~LR each, the weights are still the imported ones to within a few LR
    (a fresh initialisation differs from them by the init scale, 0.02)."""
    from trainer.inference import read_model_weights

    imported = read_model_weights(hf_dir).weights
    trained = read_model_weights(single.checkpoint).weights
    assert sorted(trained) == sorted(imported)
    for name, tensor in imported.items():
        drift = (trained[name] - tensor).abs().max().item()
        assert drift <= 2 * STEPS * LR, (name, drift)
    assert sorted(single.losses) == list(range(1, STEPS + 1))


@pytest.fixture(scope="module")
def layout_run(small_corpus, hf_dir, tmp_path_factory) -> Path:
    """The same start at tp=2 x pp=2 (one torchrun of 4): the directory of the run."""
    tmp_path = tmp_path_factory.mktemp("tp2-pp2")
    result = launch_instrumented(4, ["parallel.tp=2", "parallel.pp=2", *run_args(small_corpus, hf_dir),
                                     "train.run_name=init"], tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return tmp_path


def test_imported_model_trains_at_tp2_pp2_as_in_one_process(layout_run, single):
    assert_same_curve(layout_run / "runs" / "init", single, steps=STEPS)
    assert_same_gradients(layout_run / "grads", single)


def final_checkpoint(run_root: Path) -> Path:
    return run_root / "runs" / "init" / "checkpoints" / f"step_{STEPS:08d}"


def test_a_tp2_pp2_checkpoint_generates_the_text_of_the_single_process_one(layout_run, single):
    from trainer.decoding import GenerationSettings, generate
    from trainer.inference import CachedDecoder, load_model

    settings = GenerationSettings(max_new_tokens=16)
    texts = []
    for checkpoint in (single.checkpoint, final_checkpoint(layout_run)):
        loaded = load_model(checkpoint, device="cpu")
        prompt = loaded.tokenizer.encode("def main(").ids
        [[ids]] = generate(CachedDecoder(loaded), [prompt], settings)
        texts.append(loaded.tokenizer.decode(ids, skip_special_tokens=False))
    assert len(texts[0]) > 0 and texts[0] == texts[1]


def test_a_tp2_pp2_checkpoint_exports_to_transformers(layout_run, tmp_path):
    from transformers import AutoModelForCausalLM

    from trainer.convert import main as convert
    from trainer.inference import load_model

    checkpoint = final_checkpoint(layout_run)
    assert convert(["to-hf", str(checkpoint), "--out", str(tmp_path / "hf")]) == 0
    theirs, info = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not any(info.values()), info
    ours = load_model(checkpoint, device="cpu")
    ids = torch.randint(0, ours.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ours.model(ids)[..., : ours.vocab_size]
        got = theirs.eval()(ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize(("override", "message"), [
    ("model.n_layer=3", "has model.n_layer=2; this run has model.n_layer=3 (model=tiny)"),
    ("model.ffn_hidden_size=64", "has model.ffn_hidden_size=128; this run has model.ffn_hidden_size=64"),
])
def test_weights_of_another_shape_are_named(override, message, small_corpus, hf_dir, tmp_path):
    from trainer.config import ConfigError

    config = compose_config([*run_args(small_corpus, hf_dir), override, f"train.run_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=re.escape(f"train.init_from={hf_dir} {message}")):
        run(config)


def test_weights_trained_with_another_tokenizer_are_refused(small_corpus, tmp_path):
    from trainer.config import ConfigError

    other = tmp_path / "other-tokenizer.json"
    tokenizer = json.loads((small_corpus / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    vocab["self"], vocab["Ġ="] = vocab["Ġ="], vocab["self"]  # the same tokens under other ids
    other.write_text(json.dumps(tokenizer))
    hf = hf_gpt2_directory(tmp_path / "hf", other)
    config = compose_config([*run_args(small_corpus, hf), f"train.run_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match="was trained with another tokenizer than .*tokenizer.json: set "
                                          "data.tokenizer_path"):
        run(config)
