"""Text generation from a causal language model: greedy, sampling and beam search.

`generate(lm, prompts, settings)` decodes a batch of token-id prompts through any model that implements the
small `CausalLM` protocol (prefill a left-padded batch, decode one token per row, select cache rows). It
returns, for every prompt, `settings.num_return_sequences` lists of new token ids.

The semantics are those of Hugging Face `transformers`' `generate()` (5.x), so that the same weights give the
same ids for greedy decoding and beam search:

- Logits are turned into scores by processors in a fixed order: repetition penalty, no-repeat n-gram ban,
  then (sampling only) temperature, top-k, top-p. Penalties look at the whole sequence, prompt included.
- Beam search applies the processors to log-probabilities (log_softmax first), keeps `num_beams` running
  beams scored by cumulative log-probability, considers `2 * num_beams` candidates per step so that beams
  ending in eos can be set aside while `num_beams` keep running, and keeps the `num_beams` best finished
  hypotheses, each scored `sum_logprobs / new_length ** length_penalty`. A prompt stops when its finished
  hypotheses are all in and the best running beam can no longer beat the worst of them (HF's heuristic:
  the running beam's score is divided by the current length, or by `max_new_tokens` when
  `early_stopping="never"` and the length penalty is positive), or as soon as they are all in with
  `early_stopping=True`.

One deliberate difference: left padding is invisible here. Penalties and n-gram bans ignore the padding of
shorter prompts, so a prompt decodes as it would alone. (HF ignores padding in its repetition penalty too,
but its n-gram ban sees the pad id; the two agree unless the pad id itself gets generated.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
import torch.nn.functional as F

# A score that loses every comparison but keeps arithmetic finite (HF's value: the results match bit for bit).
UNLIKELY = -1.0e9


class CausalLM(Protocol):
    """A language model with a decoding cache, as `generate` drives it."""

    vocab_size: int  # the real vocabulary; logits have exactly this many columns

    def prefill(self, input_ids: torch.LongTensor, attention_mask: torch.BoolTensor, max_length: int) -> torch.Tensor:
        """input_ids (B, T) left-padded prompts, attention_mask (B, T) True for real tokens; starts a fresh
        cache able to hold max_length tokens per row; returns fp32 logits (B, vocab_size) for the next token."""
        ...

    def decode(self, next_ids: torch.LongTensor) -> torch.Tensor:
        """next_ids (B,): one more (real) token per row; returns fp32 logits (B, vocab_size)."""
        ...

    def select(self, rows: torch.LongTensor) -> None:
        """Keep cache rows `rows` (indices, repeats allowed, in that order): beam reordering, expansion."""
        ...


@dataclass(frozen=True)
class GenerationSettings:
    """How to decode. The defaults are greedy decoding of up to 32 new tokens."""

    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0  # sampling only
    top_k: int = 0  # sampling only; 0 = off
    top_p: float = 1.0  # sampling only; 1.0 = off
    num_beams: int = 1  # 1 = no beam search
    length_penalty: float = 1.0  # beam search: finished score = sum_logprobs / new_length ** length_penalty
    repetition_penalty: float = 1.0  # 1.0 = off
    no_repeat_ngram_size: int = 0  # 0 = off
    num_return_sequences: int = 1
    early_stopping: bool | Literal["never"] = False  # beam search stopping rule, as HF's
    eos_token_id: int | None = None
    seed: int | None = None  # sampling: a local generator seeded with this; None = fresh entropy

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "top_k", "num_beams", "no_repeat_ngram_size", "num_return_sequences"):
            _require_int(name, getattr(self, name))
        for name in ("temperature", "top_p", "length_penalty", "repetition_penalty"):
            _require_finite(name, getattr(self, name))
        if not isinstance(self.do_sample, bool):
            _invalid("do_sample", self.do_sample, "must be True or False")
        if self.max_new_tokens < 1:
            _invalid("max_new_tokens", self.max_new_tokens, "must be at least 1")
        if self.temperature <= 0:
            _invalid("temperature", self.temperature, "must be > 0 (greedy decoding and beam search do not sample)")
        if self.top_k < 0:
            _invalid("top_k", self.top_k, "must be >= 0 (0 turns it off)")
        if not 0 < self.top_p <= 1:
            _invalid("top_p", self.top_p, "must be in (0, 1] (1.0 turns it off)")
        if self.num_beams < 1:
            _invalid("num_beams", self.num_beams, "must be at least 1")
        if self.repetition_penalty <= 0:
            _invalid("repetition_penalty", self.repetition_penalty, "must be > 0 (1.0 turns it off)")
        if self.no_repeat_ngram_size < 0:
            _invalid("no_repeat_ngram_size", self.no_repeat_ngram_size, "must be >= 0 (0 turns it off)")
        if self.num_return_sequences < 1:
            _invalid("num_return_sequences", self.num_return_sequences, "must be at least 1")
        if self.num_beams > 1 and self.num_return_sequences > self.num_beams:
            _invalid("num_return_sequences", self.num_return_sequences,
                     f"must be <= num_beams ({self.num_beams}): beam search returns its best finished beams")
        if self.num_beams == 1 and not self.do_sample and self.num_return_sequences > 1:
            _invalid("num_return_sequences", self.num_return_sequences,
                     "must be 1 for greedy decoding (all sequences would be the same); sample or use beams")
        if self.early_stopping not in (True, False, "never"):
            _invalid("early_stopping", self.early_stopping, "must be True, False or 'never'")
        if self.eos_token_id is not None:
            _require_int("eos_token_id", self.eos_token_id)
            if self.eos_token_id < 0:
                _invalid("eos_token_id", self.eos_token_id, "must be >= 0 or None")
        if self.seed is not None:
            _require_int("seed", self.seed)


class InvalidSetting(ValueError):
    """A generation setting out of range; `field` names it (a command line can name its option instead)."""

    def __init__(self, field: str, value: object, why: str):
        super().__init__(f"generation setting {field}={value!r} {why}")
        self.field, self.value, self.why = field, value, why


def _invalid(field: str, value: object, why: str) -> None:
    raise InvalidSetting(field, value, why)


def _require_int(field: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        _invalid(field, value, "must be an integer")


def _require_finite(field: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        _invalid(field, value, "must be a finite number")


# ----------------------------------------------------------------------------------------------------------
# Logits processors. `scores` is (N, V); `sequences` is (N, L) token ids, where ids >= V (the padding marker)
# are ignored. Each returns new scores and leaves its input alone.


def apply_repetition_penalty(scores: torch.Tensor, sequences: torch.Tensor, penalty: float) -> torch.Tensor:
    """Make every token already in the sequence less likely: positive scores are divided by `penalty`,
    negative ones multiplied (CTRL, Keskar et al. 2019)."""
    vocab = scores.shape[-1]
    ids = sequences.clamp(max=vocab)  # padding lands in a spare column, dropped below
    padded = F.pad(scores, (0, 1))
    seen = padded.gather(1, ids)
    penalised = torch.where(seen < 0, seen * penalty, seen / penalty)
    return padded.scatter(1, ids, penalised)[:, :vocab]


def ban_repeated_ngrams(scores: torch.Tensor, sequences: torch.Tensor, ngram_size: int) -> torch.Tensor:
    """Forbid (score -inf) each token that would complete an n-gram already present in the sequence."""
    length = sequences.shape[1]
    if length < ngram_size:
        return scores
    vocab = scores.shape[-1]
    suffix = sequences[:, length - ngram_size + 1:]  # the n-1 tokens a new n-gram would start with
    windows = sequences.unfold(1, ngram_size, 1)  # (N, L - n + 1, n): every n-gram so far
    repeats_suffix = (windows[..., :-1] == suffix[:, None, :]).all(dim=-1)
    completions = torch.where(repeats_suffix, windows[..., -1].clamp(max=vocab), vocab)
    banned = torch.zeros(scores.shape[0], vocab + 1, dtype=torch.bool, device=scores.device)
    banned.scatter_(1, completions, True)
    return scores.masked_fill(banned[:, :vocab], -math.inf)


def apply_temperature(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """Sharpen (< 1) or flatten (> 1) the distribution."""
    return scores / temperature


def top_k_filter(scores: torch.Tensor, top_k: int, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Keep the `top_k` best tokens of each row (ties with the k-th included), -inf for the rest."""
    keep = min(max(top_k, min_tokens_to_keep), scores.shape[-1])
    kth_best = torch.topk(scores, keep).values[..., -1:]
    return scores.masked_fill(scores < kth_best, -math.inf)


def top_p_filter(scores: torch.Tensor, top_p: float, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Nucleus filtering: keep the smallest set of best tokens whose probability reaches `top_p`."""
    ascending, order = torch.sort(scores, descending=False)
    mass_up_to = ascending.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = mass_up_to <= 1 - top_p  # the unlikely tail holding at most 1 - top_p of the mass
    drop_sorted[..., -min_tokens_to_keep:] = False
    drop = drop_sorted.scatter(1, order, drop_sorted)
    return scores.masked_fill(drop, -math.inf)


def process_scores(scores: torch.Tensor, sequences: torch.Tensor, settings: GenerationSettings,
                   min_tokens_to_keep: int = 1) -> torch.Tensor:
    """All processors that `settings` turns on, in HF's order: penalties first, then the sampling warpers."""
    if settings.repetition_penalty != 1.0:
        scores = apply_repetition_penalty(scores, sequences, settings.repetition_penalty)
    if settings.no_repeat_ngram_size > 0:
        scores = ban_repeated_ngrams(scores, sequences, settings.no_repeat_ngram_size)
    if settings.do_sample:
        if settings.temperature != 1.0:
            scores = apply_temperature(scores, settings.temperature)
        if settings.top_k > 0:
            scores = top_k_filter(scores, settings.top_k, min_tokens_to_keep)
        if settings.top_p < 1.0:
            scores = top_p_filter(scores, settings.top_p, min_tokens_to_keep)
    return scores


# ----------------------------------------------------------------------------------------------------------
# The batch


@dataclass
class PromptBatch:
    """Prompts left-padded to one length. In `history` the padding is `vocab_size`, which processors ignore."""

    input_ids: torch.Tensor  # (B, T), padding replaced by token 0 (any real id: it is masked out)
    attention_mask: torch.Tensor  # (B, T) True for real tokens
    history: torch.Tensor  # (B, T), padding = vocab_size


def left_pad(prompts: list[list[int]], vocab_size: int, device: torch.device | str = "cpu") -> PromptBatch:
    """Stack prompts of different lengths into one left-padded batch."""
    width = max(len(p) for p in prompts)
    history = torch.full((len(prompts), width), vocab_size, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        history[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
    history = history.to(device)
    mask = history < vocab_size
    return PromptBatch(input_ids=history.masked_fill(~mask, 0), attention_mask=mask, history=history)


def check_prompts(prompts: list[list[int]], vocab_size: int) -> None:
    """One clear ValueError for prompts that cannot be decoded."""
    if not prompts:
        raise ValueError("no prompts to generate from")
    for number, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {number} is empty: generation needs at least one token")
        bad = [t for t in prompt if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompt {number} has token ids outside [0, {vocab_size}): {bad[:5]}")


def make_generator(settings: GenerationSettings, device: torch.device) -> torch.Generator | None:
    """A local random generator for sampling (never the global one): seeded, or fresh entropy."""
    if not settings.do_sample:
        return None
    generator = torch.Generator(device=device)
    if settings.seed is None:
        generator.seed()
    else:
        generator.manual_seed(settings.seed)
    return generator


def generate(lm: CausalLM, prompts: list[list[int]], settings: GenerationSettings) -> list[list[list[int]]]:
    """For each prompt, `settings.num_return_sequences` lists of new token ids (prompt excluded; a sequence
    ends with eos if it produced one, else after `max_new_tokens`)."""
    check_prompts(prompts, lm.vocab_size)
    if settings.eos_token_id is not None and settings.eos_token_id >= lm.vocab_size:
        _invalid("eos_token_id", settings.eos_token_id, f"must be < the vocabulary size {lm.vocab_size}")
    with torch.inference_mode():
        if settings.num_beams > 1:
            return beam_search(lm, prompts, settings)
        return sample_or_greedy(lm, prompts, settings)


# ----------------------------------------------------------------------------------------------------------
# Greedy decoding and sampling


def sample_or_greedy(lm: CausalLM, prompts: list[list[int]], settings: GenerationSettings) -> list[list[list[int]]]:
    """One token per step per sequence: the best (greedy) or a draw from the processed distribution.
    Several samples of a prompt are consecutive rows of the batch."""
    copies = settings.num_return_sequences
    batch = left_pad(prompts, lm.vocab_size)
    rows = torch.arange(len(prompts)).repeat_interleave(copies)
    logits = lm.prefill(batch.input_ids[rows], batch.attention_mask[rows], _cache_length(batch, settings))
    history = batch.history[rows].to(logits.device)
    generator = make_generator(settings, logits.device)
    eos = settings.eos_token_id
    finished = torch.zeros(len(rows), dtype=torch.bool, device=logits.device)
    lengths = torch.full((len(rows),), settings.max_new_tokens, dtype=torch.long, device=logits.device)
    for step in range(settings.max_new_tokens):
        scores = process_scores(logits, history, settings)
        next_ids = _choose_tokens(scores, generator)
        if eos is not None:
            next_ids = next_ids.masked_fill(finished, eos)  # a finished row idles on eos
            just_finished = (next_ids == eos) & ~finished
            lengths = torch.where(just_finished, step + 1, lengths)
            finished |= just_finished
        history = torch.cat([history, next_ids[:, None]], dim=1)
        if step + 1 == settings.max_new_tokens or bool(finished.all()):
            break
        logits = lm.decode(next_ids)
    width = batch.history.shape[1]
    new_ids = history[:, width:].tolist()
    flat = [ids[:length] for ids, length in zip(new_ids, lengths.tolist(), strict=True)]
    return [flat[i * copies:(i + 1) * copies] for i in range(len(prompts))]


def _choose_tokens(scores: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    if generator is None:
        return scores.argmax(dim=-1)
    return torch.multinomial(scores.softmax(dim=-1), num_samples=1, generator=generator).squeeze(1)


def _cache_length(batch: PromptBatch, settings: GenerationSettings) -> int:
    return batch.history.shape[1] + settings.max_new_tokens


# ----------------------------------------------------------------------------------------------------------
# Beam search


@dataclass
class Beams:
    """Beam-search state of B prompts with K beams each; token tensors hold new tokens only."""

    running_tokens: torch.Tensor  # (B, K, max_new)
    running_scores: torch.Tensor  # (B, K) cumulative log-probs, best first
    finished_tokens: torch.Tensor  # (B, K, max_new) best finished hypotheses, best first
    finished_scores: torch.Tensor  # (B, K) length-penalised scores; UNLIKELY where none yet
    finished_lengths: torch.Tensor  # (B, K)
    is_finished: torch.Tensor  # (B, K) whether the slot holds a real finished hypothesis
    still_open: torch.Tensor  # (B,) whether the prompt may still gain a better finished hypothesis


@dataclass
class Candidates:
    """The 2K best one-token extensions of each prompt's running beams, best first."""

    scores: torch.Tensor  # (B, 2K) cumulative log-probs
    source_beam: torch.Tensor  # (B, 2K) which running beam each extends
    tokens: torch.Tensor  # (B, 2K, max_new) the extended new tokens
    done: torch.Tensor  # (B, 2K) ends in eos or reaches max_new_tokens


def beam_search(lm: CausalLM, prompts: list[list[int]], settings: GenerationSettings) -> list[list[list[int]]]:
    """Beam search (beam sampling when `do_sample`): the `num_return_sequences` best finished hypotheses."""
    num_prompts, num_beams = len(prompts), settings.num_beams
    batch = left_pad(prompts, lm.vocab_size)
    rows = torch.arange(num_prompts).repeat_interleave(num_beams)
    logits = lm.prefill(batch.input_ids[rows], batch.attention_mask[rows], _cache_length(batch, settings))
    device = logits.device
    history = batch.history[rows].to(device)  # (B*K, T + step) for the processors
    generator = make_generator(settings, device)
    beams = start_beams(num_prompts, num_beams, settings.max_new_tokens, device)
    for step in range(settings.max_new_tokens):
        log_probs = process_scores(logits.log_softmax(dim=-1), history, settings, min_tokens_to_keep=2)
        candidates = best_candidates(beams, log_probs, step, settings, generator)
        source_rows = keep_running_beams(beams, candidates)
        keep_finished_hypotheses(beams, candidates, step, settings)
        close_prompts_that_cannot_improve(beams, step + 1, settings)
        if not bool(beams.still_open.any()) or bool(candidates.done.all()):
            break
        next_ids = beams.running_tokens[:, :, step].reshape(-1)
        history = torch.cat([history[source_rows], next_ids[:, None]], dim=1)
        lm.select(source_rows)
        logits = lm.decode(next_ids)
    return best_finished(beams, settings.num_return_sequences)


def start_beams(num_prompts: int, num_beams: int, max_new_tokens: int, device: torch.device) -> Beams:
    """K copies of each prompt; only the first counts (score 0, the others UNLIKELY) so that the first step
    does not pick the same token K times."""
    tokens = torch.zeros(num_prompts, num_beams, max_new_tokens, dtype=torch.long, device=device)
    running_scores = torch.zeros(num_prompts, num_beams, device=device)
    running_scores[:, 1:] = UNLIKELY
    return Beams(
        running_tokens=tokens,
        running_scores=running_scores,
        finished_tokens=tokens.clone(),
        finished_scores=torch.full((num_prompts, num_beams), UNLIKELY, device=device),
        finished_lengths=torch.zeros(num_prompts, num_beams, dtype=torch.long, device=device),
        is_finished=torch.zeros(num_prompts, num_beams, dtype=torch.bool, device=device),
        still_open=torch.ones(num_prompts, dtype=torch.bool, device=device),
    )


def best_candidates(beams: Beams, log_probs: torch.Tensor, step: int, settings: GenerationSettings,
                    generator: torch.Generator | None) -> Candidates:
    """Score every (beam, token) extension by cumulative log-prob and keep the 2K best (or draw 2K without
    replacement when sampling): with at most K of them ending in eos, K can always keep running."""
    num_prompts, num_beams, _ = beams.running_tokens.shape
    vocab = log_probs.shape[-1]
    total = (log_probs.view(num_prompts, num_beams, vocab) + beams.running_scores[:, :, None])
    total = total.view(num_prompts, num_beams * vocab)
    width = 2 * num_beams
    if generator is None:
        scores, flat_index = torch.topk(total, width)
    else:
        flat_index = torch.multinomial(total.softmax(dim=-1), width, generator=generator)
        scores = total.gather(1, flat_index)
    source_beam, token = flat_index // vocab, flat_index % vocab
    tokens = _take_beams(beams.running_tokens, source_beam).clone()
    tokens[:, :, step] = token
    done = torch.full_like(token, step + 1 == settings.max_new_tokens, dtype=torch.bool)
    if settings.eos_token_id is not None:
        done |= token == settings.eos_token_id
    return Candidates(scores=scores, source_beam=source_beam, tokens=tokens, done=done)


def keep_running_beams(beams: Beams, candidates: Candidates) -> torch.Tensor:
    """The K best candidates that have not finished run on. Returns the flat cache rows they extend."""
    num_prompts, num_beams, _ = beams.running_tokens.shape
    still_running = candidates.scores + candidates.done.float() * UNLIKELY
    chosen = torch.topk(still_running, num_beams).indices
    beams.running_scores = still_running.gather(1, chosen)
    beams.running_tokens = _take_beams(candidates.tokens, chosen)
    first_row = torch.arange(num_prompts, device=chosen.device)[:, None] * num_beams
    return (first_row + candidates.source_beam.gather(1, chosen)).view(-1)


def keep_finished_hypotheses(beams: Beams, candidates: Candidates, step: int, settings: GenerationSettings) -> None:
    """Add the candidates that just finished, among the K best only, to each open prompt's finished set
    (length-penalised), keeping the K best of old and new."""
    num_beams = beams.running_tokens.shape[1]
    among_best = torch.arange(candidates.scores.shape[1], device=candidates.scores.device) < num_beams
    accepted = candidates.done & among_best & beams.still_open[:, None]
    new_length = step + 1
    new_scores = candidates.scores / (new_length ** settings.length_penalty)
    new_scores = new_scores.masked_fill(~accepted, -math.inf)  # never chosen over a placeholder
    scores = torch.cat([beams.finished_scores, new_scores], dim=1)
    best = torch.topk(scores, num_beams).indices
    beams.finished_scores = scores.gather(1, best)
    beams.finished_tokens = _take_beams(torch.cat([beams.finished_tokens, candidates.tokens], dim=1), best)
    lengths = torch.cat([beams.finished_lengths, torch.full_like(candidates.source_beam, new_length)], dim=1)
    beams.finished_lengths = lengths.gather(1, best)
    beams.is_finished = torch.cat([beams.is_finished, accepted], dim=1).gather(1, best)


def close_prompts_that_cannot_improve(beams: Beams, new_length: int, settings: GenerationSettings) -> None:
    """A prompt closes (for good) once all K finished slots are filled and either `early_stopping` is True or
    the best running beam, optimistically length-penalised, would not beat the worst finished one."""
    all_filled = beams.is_finished.all(dim=1)
    if settings.early_stopping is True:
        beams.still_open &= ~all_filled
        return
    if settings.early_stopping == "never" and settings.length_penalty > 0:
        best_length = settings.max_new_tokens
    else:
        best_length = new_length
    best_possible = beams.running_scores[:, 0] / (best_length ** settings.length_penalty)
    worst_finished = beams.finished_scores.min(dim=1).values
    beams.still_open &= ~all_filled | (best_possible > worst_finished)


def best_finished(beams: Beams, count: int) -> list[list[list[int]]]:
    """The `count` best finished hypotheses of each prompt, as lists of new token ids."""
    tokens = beams.finished_tokens[:, :count].tolist()
    lengths = beams.finished_lengths[:, :count].tolist()
    return [[ids[:n] for ids, n in zip(row_ids, row_lengths, strict=True)]
            for row_ids, row_lengths in zip(tokens, lengths, strict=True)]


def _take_beams(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """values (B, K, ...) gathered along the beam axis by index (B, J) -> (B, J, ...)."""
    while index.dim() < values.dim():
        index = index.unsqueeze(-1)
    return torch.take_along_dim(values, index, dim=1)
