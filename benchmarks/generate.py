"""Decoding speed against transformers: `python -m benchmarks.generate`.

One random GPT-2-small-shaped model (12 layers, 768 wide, 12 heads, 50,257 tokens; no download) is built
with transformers, saved with `save_pretrained` and loaded by `trainer.inference.load_model`, so both sides
hold the same weights. The same prompts (random token ids) are decoded with the same settings by
`trainer.decoding.generate` (our KV cache) and by `GPT2LMHeadModel.generate()` (transformers' cache), greedy
and with beam search (4 beams), in alternating repeats; end-of-text is disabled on both sides so that every
sequence runs to `--new-tokens`. Reports new tokens per second of each and the ratio (ours / transformers;
> 1 means faster), checks that both returned the same ids, prints a markdown table and writes it with a
JSON file to `--out-dir`. Needs the `hf` extra (transformers).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

GPT2_SMALL = {"n_layer": 12, "n_head": 12, "n_embd": 768, "n_positions": 1024, "vocab_size": 50257}
TINY = {"n_layer": 2, "n_head": 4, "n_embd": 64, "n_positions": 128, "vocab_size": 1000}


@dataclass
class Result:
    """One decoding mode: median seconds and new tokens per second of each side, and their ratio."""

    mode: str
    new_tokens: int
    ours_s: float
    hf_s: float
    same_ids: bool

    @property
    def ours_tokens_per_s(self) -> float:
        return self.new_tokens / self.ours_s

    @property
    def hf_tokens_per_s(self) -> float:
        return self.new_tokens / self.hf_s

    @property
    def speedup(self) -> float:
        return self.hf_s / self.ours_s


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4, help="prompts decoded together")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--beams", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per side (after one warm-up)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model instead of GPT-2 small (smoke test)")
    parser.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    return parser.parse_args(argv)


def build_models(shape: dict, device: str, dtype: str, workdir: Path):
    """(transformers model, our loaded model): the same random weights, on the same device and dtype."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from trainer.inference import load_model

    torch.manual_seed(0)
    config = GPT2Config(**shape, bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(workdir)
    ours = load_model(workdir, device=device, dtype=dtype)
    theirs = GPT2LMHeadModel.from_pretrained(workdir).to(device=ours.device, dtype=ours.dtype).eval()
    return theirs, ours


def hf_generate(model, prompts: torch.Tensor, new_tokens: int, beams: int) -> list[list[int]]:
    output = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                            min_new_tokens=new_tokens, do_sample=False, num_beams=beams, eos_token_id=None,
                            pad_token_id=0)
    return output[:, prompts.shape[1]:].tolist()


def our_generate(loaded, prompts: torch.Tensor, new_tokens: int, beams: int) -> list[list[int]]:
    from trainer.decoding import GenerationSettings, generate
    from trainer.inference import CachedDecoder

    settings = GenerationSettings(max_new_tokens=new_tokens, num_beams=beams, eos_token_id=None)
    return [ids for per_prompt in generate(CachedDecoder(loaded), prompts.tolist(), settings) for ids in per_prompt]


def timed(fn, device: torch.device) -> tuple[float, list[list[int]]]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def compare(mode: str, beams: int, theirs, ours, prompts: torch.Tensor, args: argparse.Namespace) -> Result:
    """Warm up both, then alternate timed repeats; the medians."""
    device = ours.device
    hf_ids = hf_generate(theirs, prompts.to(device), args.new_tokens, beams)
    our_ids = our_generate(ours, prompts, args.new_tokens, beams)
    ours_s, hf_s = [], []
    for _ in range(args.repeats):
        ours_s.append(timed(lambda: our_generate(ours, prompts, args.new_tokens, beams), device)[0])
        with torch.inference_mode():
            hf_s.append(timed(lambda: hf_generate(theirs, prompts.to(device), args.new_tokens, beams), device)[0])
    return Result(mode, prompts.shape[0] * args.new_tokens, statistics.median(ours_s), statistics.median(hf_s),
                  hf_ids == our_ids)


def table(results: list[Result], header: str) -> str:
    lines = [header, "", "| mode | new tokens | ours tokens/s | transformers tokens/s | ours / transformers | same ids |",
             "|---|---:|---:|---:|---:|---|"]
    for r in results:
        lines.append(f"| {r.mode} | {r.new_tokens} | {r.ours_tokens_per_s:,.1f} | {r.hf_tokens_per_s:,.1f} | "
                     f"{r.speedup:.2f}x | {'yes' if r.same_ids else 'NO'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import transformers
    except ImportError:
        print("benchmarks.generate needs transformers: pip install -e .[hf]", file=sys.stderr)
        return 2
    shape = TINY if args.tiny else GPT2_SMALL
    with tempfile.TemporaryDirectory() as workdir:
        theirs, ours = build_models(shape, args.device, args.dtype, Path(workdir))
    prompts = torch.randint(1, shape["vocab_size"], (args.batch, args.prompt_len),
                            generator=torch.Generator().manual_seed(1))
    results = [compare("greedy", 1, theirs, ours, prompts, args),
               compare(f"beam search ({args.beams} beams)", args.beams, theirs, ours, prompts, args)]
    header = (f"{'tiny' if args.tiny else 'GPT-2 small'} shape, {args.batch} prompts x {args.prompt_len} tokens, "
              f"{args.new_tokens} new tokens, {ours.device} {str(ours.dtype).removeprefix('torch.')}, "
              f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads")
    report = table(results, header)
    print(report)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "generate.md").write_text(report + "\n")
    (args.out_dir / "generate.json").write_text(json.dumps(
        [asdict(r) | {"speedup": r.speedup} for r in results], indent=1))
    return 0 if all(r.same_ids for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
