"""trainer/decoding.py against Hugging Face transformers' generate() and logits processors.

The oracle is a random `GPT2LMHeadModel` (no download). `RecomputingLM` is the simplest faithful `CausalLM`
over it: it keeps each row's tokens and runs the whole sequence every step. `assert_same_as_hf_generate`
checks any `CausalLM` over the same weights (e.g. trainer.inference.CachedDecoder) against HF's generate().
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest
import torch

from trainer.decoding import (
    GenerationSettings,
    apply_repetition_penalty,
    apply_temperature,
    ban_repeated_ngrams,
    generate,
    process_scores,
    top_k_filter,
    top_p_filter,
)

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402
from transformers.generation import logits_process as hf_processors  # noqa: E402

VOCAB = 300
# Prompts of different lengths, so that a batch needs left padding.
PROMPTS = [[5, 17, 230, 41, 9, 120], [88, 3], [250, 250, 7, 64, 199, 12, 45, 101, 33], [150], [61, 62, 63, 64]]


class RecomputingLM:
    """A `CausalLM` over an HF GPT-2 without a cache: each step reruns every row's whole (left-padded) sequence
    with its attention mask and position ids counted over real tokens, as HF does for left padding."""

    def __init__(self, hf_model: GPT2LMHeadModel):
        self.model = hf_model
        self.vocab_size = hf_model.config.vocab_size
        self.ids = self.mask = None
        self.max_length = 0

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_length: int) -> torch.Tensor:
        self.ids, self.mask, self.max_length = input_ids.clone(), attention_mask.bool().clone(), max_length
        return self._next_token_logits()

    def decode(self, next_ids: torch.Tensor) -> torch.Tensor:
        assert next_ids.shape == (self.ids.shape[0],)
        self.ids = torch.cat([self.ids, next_ids[:, None]], dim=1)
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        assert self.ids.shape[1] <= self.max_length, "decoded past the cache length given to prefill"
        return self._next_token_logits()

    def select(self, rows: torch.Tensor) -> None:
        self.ids, self.mask = self.ids[rows], self.mask[rows]

    @torch.no_grad()
    def _next_token_logits(self) -> torch.Tensor:
        positions = (self.mask.long().cumsum(dim=1) - 1).clamp(min=0)
        out = self.model(input_ids=self.ids, attention_mask=self.mask.long(), position_ids=positions)
        return out.logits[:, -1].float()


def random_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    """A tiny random GPT-2; a wide initialisation makes its next-token distributions peaked, like a trained
    model's, so that decoding choices are clear-cut rather than near-ties."""
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=64, vocab_size=VOCAB, initializer_range=0.3,
                        bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1)  # tests pass their own eos (or None)
    return GPT2LMHeadModel(config).eval()


def hf_generate_kwargs(settings: GenerationSettings) -> dict:
    """The same settings as HF generate() arguments: every one that applies is explicit, so HF's defaults
    (e.g. top_k=50) play no part. The pad id is eos: a live sequence never ends with it, so HF's n-gram ban,
    which sees padding, bans nothing more than ours."""
    eos = settings.eos_token_id
    kwargs = dict(
        max_new_tokens=settings.max_new_tokens, do_sample=settings.do_sample, num_beams=settings.num_beams,
        repetition_penalty=settings.repetition_penalty, no_repeat_ngram_size=settings.no_repeat_ngram_size,
        num_return_sequences=settings.num_return_sequences, eos_token_id=eos, pad_token_id=0 if eos is None else eos,
    )  # fmt: skip
    if settings.do_sample:
        kwargs.update(temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p)
    if settings.num_beams > 1:
        kwargs.update(length_penalty=settings.length_penalty, early_stopping=settings.early_stopping)
    return kwargs


def new_tokens(output_row: list[int], prompt_width: int, eos: int | None) -> list[int]:
    """HF returns prompt + new tokens padded with pad (= eos here): the new tokens up to the first eos."""
    new = output_row[prompt_width:]
    if eos is not None and eos in new:
        new = new[: new.index(eos) + 1]
    return new


@torch.no_grad()
def hf_generate(hf_model: GPT2LMHeadModel, prompts: list[list[int]], settings: GenerationSettings,
                one_by_one: bool = False) -> list[list[list[int]]]:
    """HF generate() on all prompts in one left-padded batch, or on each prompt alone (no padding)."""
    if one_by_one:
        return [hf_generate(hf_model, [p], settings)[0] for p in prompts]
    kwargs = hf_generate_kwargs(settings)
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[kwargs["pad_token_id"]] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    if settings.seed is not None:
        torch.manual_seed(settings.seed)  # HF samples from the global generator
    rows = [new_tokens(row, width, settings.eos_token_id)
            for row in hf_model.generate(ids, attention_mask=mask, **kwargs).tolist()]
    n = settings.num_return_sequences
    return [rows[i * n:(i + 1) * n] for i in range(len(prompts))]


def assert_same_as_hf_generate(lm, hf_model: GPT2LMHeadModel, prompts: list[list[int]], hf_one_by_one: bool = False,
                               **settings) -> list[list[list[int]]]:
    """`generate(lm, prompts, GenerationSettings(**settings))` gives exactly the ids of HF generate() on the
    same weights (HF on the same left-padded batch, or on each prompt alone). Returns our output."""
    chosen = GenerationSettings(**settings)
    ours = generate(lm, prompts, chosen)
    theirs = hf_generate(hf_model, prompts, chosen, one_by_one=hf_one_by_one)
    assert ours == theirs, f"{chosen}:\nours {ours}\nHF   {theirs}"
    return ours


def greedy_continuations(hf_model: GPT2LMHeadModel, max_new_tokens: int) -> list[list[int]]:
    """Each prompt's greedy continuation, without eos."""
    plain = generate(RecomputingLM(hf_model), PROMPTS, GenerationSettings(max_new_tokens=max_new_tokens))
    return [per_prompt[0] for per_prompt in plain]


def ended_early(outputs: list[list[list[int]]], eos: int, max_new_tokens: int) -> tuple[int, int]:
    """(sequences that stopped at eos before the limit, sequences that ran to the limit without eos)."""
    flat = [seq for per_prompt in outputs for seq in per_prompt]
    early = sum(1 for s in flat if s[-1] == eos and len(s) < max_new_tokens)
    full = sum(1 for s in flat if eos not in s and len(s) == max_new_tokens)
    return early, full


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run faster on one thread, much faster on a busy machine; restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model() -> GPT2LMHeadModel:
    return random_gpt2()


@pytest.fixture(scope="module")
def eos_for_some(model) -> int:
    """A token in the 16-token greedy continuations of as many prompts as possible but not all: as eos it
    ends some sequences early and leaves others running to the limit."""
    prompts_with = Counter(t for seq in greedy_continuations(model, 16) for t in set(seq))
    return max((n, t) for t, n in prompts_with.items() if n < len(PROMPTS))[1]


@pytest.fixture(scope="module")
def eos_for_beams(model) -> int:
    """The model's favourite token after the first step: as eos, some beams end with it."""
    return Counter(t for seq in greedy_continuations(model, 16) for t in seq[1:]).most_common(1)[0][0]


# ------------------------------------------------------------------------------------------------------------
# Greedy


def test_greedy_matches_hf_batched_and_prompt_by_prompt(model, eos_for_some):
    lm = RecomputingLM(model)
    ours = assert_same_as_hf_generate(lm, model, PROMPTS, max_new_tokens=16, eos_token_id=eos_for_some)
    assert_same_as_hf_generate(lm, model, PROMPTS[:3], hf_one_by_one=True, max_new_tokens=16,
                               eos_token_id=eos_for_some)
    early, full = ended_early(ours, eos_for_some, 16)
    assert early >= 1 and full >= 1, f"eos {eos_for_some} must end some sequences early, not all: {ours}"


def test_greedy_with_penalties_matches_hf(model, eos_for_some):
    settings = dict(max_new_tokens=16, eos_token_id=eos_for_some, repetition_penalty=1.3, no_repeat_ngram_size=2)
    ours = assert_same_as_hf_generate(RecomputingLM(model), model, PROMPTS, **settings)
    plain = generate(RecomputingLM(model), PROMPTS, GenerationSettings(max_new_tokens=16, eos_token_id=eos_for_some))
    assert ours != plain, "the penalties must change something, or this test checks nothing"


def test_without_eos_every_sequence_runs_to_the_limit(model):
    ours = assert_same_as_hf_generate(RecomputingLM(model), model, PROMPTS[:3], max_new_tokens=7)
    assert [len(seq) for per_prompt in ours for seq in per_prompt] == [7, 7, 7]


# ------------------------------------------------------------------------------------------------------------
# Beam search


@pytest.mark.parametrize("length_penalty", [0.7, 1.5])
@pytest.mark.parametrize("num_return_sequences", [1, 2])
def test_beam_search_matches_hf(model, eos_for_beams, length_penalty, num_return_sequences):
    ours = assert_same_as_hf_generate(
        RecomputingLM(model), model, PROMPTS, max_new_tokens=12, eos_token_id=eos_for_beams, num_beams=4,
        length_penalty=length_penalty, repetition_penalty=1.3, no_repeat_ngram_size=2,
        num_return_sequences=num_return_sequences)
    assert all(len(per_prompt) == num_return_sequences for per_prompt in ours)
    early, full = ended_early(ours, eos_for_beams, 12)
    if length_penalty < 1:  # short hypotheses favoured: some end at eos
        assert early >= 1, f"no returned beam ends early at eos {eos_for_beams}: {ours}"
    else:  # long ones favoured: some run to the limit
        assert full >= 1, f"every returned beam ends early at eos {eos_for_beams}: {ours}"


def test_beam_search_matches_hf_prompt_by_prompt(model, eos_for_beams):
    """Left padding is invisible: the batch decodes as each prompt alone does in HF."""
    assert_same_as_hf_generate(RecomputingLM(model), model, PROMPTS[:3], hf_one_by_one=True, max_new_tokens=10,
                               eos_token_id=eos_for_beams, num_beams=4, length_penalty=0.7, repetition_penalty=1.3,
                               no_repeat_ngram_size=2, num_return_sequences=2)


@pytest.mark.parametrize("early_stopping", [True, "never"])
def test_beam_search_stopping_rules_match_hf(model, eos_for_beams, early_stopping):
    assert_same_as_hf_generate(RecomputingLM(model), model, PROMPTS, max_new_tokens=12, eos_token_id=eos_for_beams,
                               num_beams=3, length_penalty=1.2, early_stopping=early_stopping)


def test_beam_search_differs_from_greedy(model, eos_for_beams):
    """Beams really search: some prompt's best beam is not the greedy sequence."""
    greedy = generate(RecomputingLM(model), PROMPTS, GenerationSettings(max_new_tokens=12, eos_token_id=eos_for_beams))
    beams = generate(RecomputingLM(model), PROMPTS,
                     GenerationSettings(max_new_tokens=12, eos_token_id=eos_for_beams, num_beams=4))
    assert greedy != beams


# ------------------------------------------------------------------------------------------------------------
# Sampling


def test_sampling_is_reproducible_with_a_seed(model, eos_for_some):
    lm = RecomputingLM(model)

    def sample(seed: int) -> list[list[list[int]]]:
        return generate(lm, PROMPTS, GenerationSettings(max_new_tokens=10, do_sample=True, temperature=1.5,
                                                        num_return_sequences=3, seed=seed, eos_token_id=eos_for_some))

    first = sample(1)
    assert sample(1) == first
    assert sample(2) != first
    assert all(len(per_prompt) == 3 for per_prompt in first)
    assert any(len(set(map(tuple, per_prompt))) > 1 for per_prompt in first), "samples of a prompt all alike"


def test_sampling_leaves_the_global_generator_alone(model):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    generate(RecomputingLM(model), PROMPTS[:2], GenerationSettings(max_new_tokens=4, do_sample=True, seed=5))
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_sampling_draws_like_hf_from_the_same_seed(model, eos_for_some, num_beams):
    """Same processors, same row layout, the same random stream: HF's very samples (and beam samples)."""
    assert_same_as_hf_generate(RecomputingLM(model), model, PROMPTS, max_new_tokens=8, do_sample=True,
                               temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.2, num_beams=num_beams,
                               num_return_sequences=2, seed=7, eos_token_id=eos_for_some)


# ------------------------------------------------------------------------------------------------------------
# Logits processors, one by one and chained, against HF's classes on random scores


def random_scores_and_sequences(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(6, 50, generator=g) * 3
    sequences = torch.randint(0, 12, (6, 15), generator=g)  # a small alphabet: many repeats and n-grams
    return scores, sequences


def assert_identical(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs)), "-inf in different places"
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


@pytest.mark.parametrize("penalty", [0.7, 1.3])
def test_repetition_penalty_equals_hf(penalty):
    scores, sequences = random_scores_and_sequences()
    theirs = hf_processors.RepetitionPenaltyLogitsProcessor(penalty)(sequences, scores.clone())
    assert_identical(apply_repetition_penalty(scores, sequences, penalty), theirs)
    assert not torch.equal(theirs, scores)


@pytest.mark.parametrize("ngram_size", [1, 2, 3])
def test_ngram_ban_equals_hf(ngram_size):
    scores, sequences = random_scores_and_sequences()
    theirs = hf_processors.NoRepeatNGramLogitsProcessor(ngram_size)(sequences, scores.clone())
    assert_identical(ban_repeated_ngrams(scores, sequences, ngram_size), theirs)
    assert torch.isinf(theirs).any()


def test_padding_marker_is_ignored_by_the_penalties():
    """Ids >= vocab (left padding) count for nothing: same scores as the unpadded sequence."""
    scores, sequences = random_scores_and_sequences(2)
    padded = torch.cat([torch.full((6, 4), scores.shape[1]), sequences], dim=1)
    assert torch.equal(apply_repetition_penalty(scores, padded, 1.3), apply_repetition_penalty(scores, sequences, 1.3))
    assert torch.equal(ban_repeated_ngrams(scores, padded, 2), ban_repeated_ngrams(scores, sequences, 2))


@pytest.mark.parametrize("temperature", [0.5, 1.7])
def test_temperature_equals_hf(temperature):
    scores, sequences = random_scores_and_sequences()
    theirs = hf_processors.TemperatureLogitsWarper(temperature)(sequences, scores.clone())
    assert_identical(apply_temperature(scores, temperature), theirs)


@pytest.mark.parametrize(("top_k", "keep"), [(1, 1), (7, 1), (1, 2), (80, 1)])
def test_top_k_equals_hf(top_k, keep):
    scores, sequences = random_scores_and_sequences()
    theirs = hf_processors.TopKLogitsWarper(top_k, min_tokens_to_keep=keep)(sequences, scores.clone())
    assert_identical(top_k_filter(scores, top_k, keep), theirs)


@pytest.mark.parametrize(("top_p", "keep"), [(0.05, 1), (0.5, 1), (0.9, 1), (0.05, 3), (1.0, 1)])
def test_top_p_equals_hf(top_p, keep):
    scores, sequences = random_scores_and_sequences()
    theirs = hf_processors.TopPLogitsWarper(top_p, min_tokens_to_keep=keep)(sequences, scores.clone())
    assert_identical(top_p_filter(scores, top_p, keep), theirs)


def test_processor_chain_equals_hf_in_hf_order():
    scores, sequences = random_scores_and_sequences(3)
    settings = GenerationSettings(do_sample=True, repetition_penalty=1.3, no_repeat_ngram_size=2,
                                  temperature=0.6, top_k=20, top_p=0.8)
    chain = hf_processors.LogitsProcessorList([
        hf_processors.RepetitionPenaltyLogitsProcessor(1.3), hf_processors.NoRepeatNGramLogitsProcessor(2),
        hf_processors.TemperatureLogitsWarper(0.6), hf_processors.TopKLogitsWarper(20),
        hf_processors.TopPLogitsWarper(0.8)])
    assert_identical(process_scores(scores, sequences, settings), chain(sequences, scores.clone()))
    greedy = dataclasses.replace(settings, do_sample=False)  # the warpers are for sampling only
    penalties_only = hf_processors.LogitsProcessorList(chain[:2])
    assert_identical(process_scores(scores, sequences, greedy), penalties_only(sequences, scores.clone()))


# ------------------------------------------------------------------------------------------------------------
# Settings and inputs


@pytest.mark.parametrize(("field", "settings"), [
    ("num_return_sequences", dict(num_beams=2, num_return_sequences=3)),
    ("num_return_sequences", dict(num_return_sequences=2)),
    ("top_p", dict(do_sample=True, top_p=0.0)),
    ("top_p", dict(do_sample=True, top_p=1.5)),
    ("temperature", dict(do_sample=True, temperature=0.0)),
    ("temperature", dict(temperature=-1.0)),
    ("max_new_tokens", dict(max_new_tokens=0)),
    ("top_k", dict(top_k=-1)),
    ("num_beams", dict(num_beams=0)),
    ("repetition_penalty", dict(repetition_penalty=0.0)),
    ("no_repeat_ngram_size", dict(no_repeat_ngram_size=-2)),
    ("length_penalty", dict(length_penalty=float("nan"))),
    ("early_stopping", dict(early_stopping="sometimes")),
    ("eos_token_id", dict(eos_token_id=-1)),
    ("seed", dict(seed=1.5)),
    ("max_new_tokens", dict(max_new_tokens=2.0)),
])  # fmt: skip
def test_bad_settings_raise_one_error_naming_the_field(field, settings):
    with pytest.raises(ValueError, match=rf"\b{field}="):
        GenerationSettings(**settings)


def test_bad_prompts_raise(model):
    lm = RecomputingLM(model)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(lm, [[1, 2], []], GenerationSettings())
    with pytest.raises(ValueError, match="outside"):
        generate(lm, [[1, VOCAB]], GenerationSettings())
    with pytest.raises(ValueError, match="no prompts"):
        generate(lm, [], GenerationSettings())
    with pytest.raises(ValueError, match="eos_token_id"):
        generate(lm, [[1]], GenerationSettings(eos_token_id=VOCAB))


# ------------------------------------------------------------------------------------------------------------
# The command line: python -m trainer.generate, run in-process on a saved random GPT-2 with a tokenizer


CORPUS = ["def main(argv):\n    return parse(argv)\n" * 3, "import os\nimport sys\n\nclass Reader:\n    pass\n" * 3,
          "The quick brown fox jumps over the lazy dog. " * 5]  # fmt: skip


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> tuple:
    """A transformers GPT-2 directory (random weights, a tokenizer we train, end-of-text as eos), its model."""
    from data_pipeline.tokenizer import EOT_TOKEN, train_tokenizer

    tokenizer = train_tokenizer(CORPUS, 300)
    eot = tokenizer.token_to_id(EOT_TOKEN)
    torch.manual_seed(1)
    config = GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=48, vocab_size=tokenizer.get_vocab_size(),
                        initializer_range=0.3, bos_token_id=eot, eos_token_id=eot)
    model = GPT2LMHeadModel(config).eval()
    path = tmp_path_factory.mktemp("hf_gpt2")
    model.save_pretrained(path)
    (path / "tokenizer.json").write_text(tokenizer.to_str(), encoding="utf-8")
    return path, model, tokenizer, eot


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    from trainer.generate import main

    status = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_cli_greedy_prints_transformers_completions(hf_dir, capsys):
    """Our GPT with its KV cache (trainer.inference), driven by the CLI, writes HF generate()'s text."""
    path, model, tokenizer, eot = hf_dir
    prompts = ["def main(", "import os\nclass Reader"]
    status, out, err = run_cli(capsys, path, "--prompt", prompts[0], "--prompt", prompts[1], "--greedy",
                               "--max-new-tokens", 12, "--device", "cpu")
    assert status == 0, err
    for number, text in enumerate(prompts, start=1):
        ids = tokenizer.encode(text).ids
        expected = hf_generate(model, [ids], GenerationSettings(max_new_tokens=12, eos_token_id=eot))[0][0]
        header = f"--- completion 1 of 1 ({len(expected)} new tokens, "
        assert f"=== prompt {number} of 2 ===\n{text}\n{header}" in out
        assert "\n" + tokenizer.decode(expected, skip_special_tokens=False) + "\n" in out.split(header)[number]
    assert out.splitlines()[-1].startswith("generated ") and " tokens/s " in out.splitlines()[-1]


def test_cli_samples_reproducibly_from_a_prompts_file(hf_dir, capsys, tmp_path):
    path = hf_dir[0]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "def main("}\n\n{"prompt": "The quick", "id": 7}\n', encoding="utf-8")
    args = [path, "--prompts", prompts, "--max-new-tokens", 8, "--temperature", 1.3, "--top-k", 50,
            "--num-return-sequences", 2, "--seed", 3, "--device", "cpu"]
    status, first, _ = run_cli(capsys, *args)
    assert status == 0
    assert first.count("=== prompt ") == 2 and first.count("--- completion ") == 4
    assert run_cli(capsys, *args)[1].splitlines()[:-1] == first.splitlines()[:-1]  # all but the timing line
    assert run_cli(capsys, *args[:-4], "--seed", 4, "--device", "cpu")[1] != first


def test_cli_beam_search_runs(hf_dir, capsys):
    status, out, err = run_cli(capsys, hf_dir[0], "--prompt", "import", "--num-beams", 3, "--length-penalty", 0.8,
                               "--num-return-sequences", 2, "--no-repeat-ngram-size", 2, "--max-new-tokens", 6)
    assert status == 0, err
    assert out.count("--- completion ") == 2 and "seed" not in err  # beam search is deterministic


@pytest.mark.parametrize(("argv", "message"), [
    (["--prompt", ""], "--prompt number 1 is empty"),
    (["--prompt", "x", "--top-p", 1.5], "--top-p 1.5: must be in (0, 1]"),
    (["--prompt", "x", "--temperature", 0], "--temperature 0.0: must be > 0"),
    (["--prompt", "x", "--num-beams", 2, "--num-return-sequences", 3], "--num-return-sequences 3: must be <="),
    (["--prompt", "x", "--greedy", "--top-k", 5], "--greedy and --top-k contradict"),
    (["--prompts", "{missing}"], "cannot read"),
    (["--prompts", "{bad_line}"], "prompts.jsonl line 2: expected an object with a \"prompt\" string"),
    (["--prompts", "{not_json}"], "prompts.jsonl line 1: not JSON"),
    ([], "no prompt: give --prompt"),
    (["--prompt", "x", "--top-p", "high"], "argument --top-p: invalid float value"),
])  # fmt: skip
def test_cli_errors_are_one_line_and_status_2(hf_dir, capsys, tmp_path, argv, message):
    files = {"missing": tmp_path / "missing.jsonl", "bad_line": tmp_path / "prompts.jsonl",
             "not_json": tmp_path / "prompts.jsonl"}  # fmt: skip
    if "{bad_line}" in argv:
        files["bad_line"].write_text('{"prompt": "ok"}\n{"text": "no prompt field"}\n')
    if "{not_json}" in argv:
        files["not_json"].write_text("prompt: not json\n")
    argv = [str(a).format(**files) for a in argv]
    try:
        status, out, err = run_cli(capsys, hf_dir[0], *argv)
    except SystemExit as exit_:  # argparse's own errors
        status, (out, err) = exit_.code, capsys.readouterr()
    assert status == 2
    assert out == "" and len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert message in err, err


def test_cli_refuses_a_prompt_with_no_room_to_grow(hf_dir, capsys):
    path, _, tokenizer, _ = hf_dir
    length = len(tokenizer.encode("def main(").ids)
    status, _, err = run_cli(capsys, path, "--prompt", "x", "--prompt", "def main(", "--max-new-tokens", 49 - length)
    assert status == 2 and len(err.strip().splitlines()) == 1
    assert (f"error: prompt 2 has {length} tokens; with --max-new-tokens {49 - length} that is 49, more than the "
            "model's context of 48 tokens") in err


def test_cli_refuses_a_directory_that_is_no_model(capsys, tmp_path):
    status, _, err = run_cli(capsys, tmp_path, "--prompt", "x")
    assert status == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
