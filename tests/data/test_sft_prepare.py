"""Chat template rendering and prepare_sft: masks, special tokens, bad input, length limit, split, index."""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from data_pipeline.chat_template import (
    DEFAULT_TEMPLATE,
    ChatTemplate,
    add_special_tokens,
    load_template,
    prompt_response_messages,
    render,
    render_generation_prompt,
)
from data_pipeline.corpus import split_of
from data_pipeline.prepare_sft import SFTOptions, main, prepare_sft
from data_pipeline.tokenizer import EOT_TOKEN, load_tokenizer, train_tokenizer

TEXT = "The quick brown fox jumps over the lazy dog. def add(a, b):\n    return a + b\n" * 20


def make_tokenizer(path: Path) -> Path:
    """A small byte-level BPE tokenizer.json (the pretraining tokenizer of these tests)."""
    tok = train_tokenizer([TEXT], vocab_size=300)
    path.write_text(tok.to_str())
    return path


def good_records(n: int) -> list[dict]:
    """n distinct conversations of varied lengths, alternating the two formats."""
    records = []
    for i in range(n):
        response = f"answer {i}: " + "the lazy dog " * (i % 7 + 1) * (3 if i % 5 == 0 else 1)
        if i % 2:
            records.append({"prompt": f"question {i}?", "response": response})
        else:
            records.append({"messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": f"question {i}?"},
                {"role": "assistant", "content": response},
                {"role": "user", "content": "and again?"},
                {"role": "assistant", "content": f"again {i}"},
            ]})  # fmt: skip
    return records


def write_jsonl(path: Path, lines: list) -> Path:
    """JSONL lines (dicts are dumped, strings written as they are); .gz compressed by name."""
    text = "".join((json.dumps(x) if not isinstance(x, str) else x) + "\n" for x in lines)
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


def prepare_dir(tmp: Path, records: list[dict], **overrides) -> tuple[Path, dict]:
    """prepare_sft of records (in one .jsonl.gz) into tmp/out with the test tokenizer: (out, index)."""
    tmp.mkdir(parents=True, exist_ok=True)
    source = write_jsonl(tmp / "chats.jsonl.gz", records)
    opts = dict(sources=[str(source)], out=str(tmp / "out"), tokenizer=str(make_tokenizer(tmp / "tok.json")),
                max_length=4096, val_fraction=0.25, seed=3, shard_max_tokens=1500)  # fmt: skip
    opts.update(overrides)
    return tmp / "out", prepare_sft(SFTOptions(**opts))


def read_samples(out: Path, index: dict, split: str) -> list[tuple[np.ndarray, np.ndarray, dict]]:
    """(tokens, mask, meta) of a split's samples in index order, read with plain webdataset."""
    urls = [str(out / s["file"]) for s in index["splits"][split]["shards"]]
    ds = wds.WebDataset(urls, shardshuffle=False).decode()
    return [(s["tokens.npy"], s["mask.npy"], s["json"]) for s in ds]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    t = load_tokenizer(make_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json"))
    add_special_tokens(t, DEFAULT_TEMPLATE)
    return t


def _enc(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False).ids


# --- rendering ---------------------------------------------------------------------------------------
def test_render_is_the_concatenated_pieces_with_mask_on_assistant_content_and_end(tok):
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "add two numbers"},
        {"role": "assistant", "content": "def add(a, b):"},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": "return a + b"},
    ]
    ids, mask = render(tok, DEFAULT_TEMPLATE, messages)
    sp = {t: tok.token_to_id(t) for t in ("<|system|>", "<|user|>", "<|assistant|>", EOT_TOKEN)}
    nl = _enc(tok, "\n")
    expected = [  # (ids, trained)
        ([sp["<|system|>"]] + nl, 0), (_enc(tok, "be brief"), 0), (nl, 0),
        ([sp["<|user|>"]] + nl, 0), (_enc(tok, "add two numbers"), 0), (nl, 0),
        ([sp["<|assistant|>"]] + nl, 0), (_enc(tok, "def add(a, b):"), 1), ([sp[EOT_TOKEN]], 1),
        ([sp["<|user|>"]] + nl, 0), (_enc(tok, "again"), 0), (nl, 0),
        ([sp["<|assistant|>"]] + nl, 0), (_enc(tok, "return a + b"), 1), ([sp[EOT_TOKEN]], 1),
    ]  # fmt: skip
    assert ids.tolist() == [i for piece, _ in expected for i in piece]
    assert mask.tolist() == [m for piece, m in expected for _ in piece]
    assert mask.dtype == np.uint8 and ids.size == mask.size
    assert tok.decode(ids[mask == 1].tolist(), skip_special_tokens=False) == (
        f"def add(a, b):{EOT_TOKEN}return a + b{EOT_TOKEN}"
    )


def test_prompt_response_is_one_user_and_one_assistant_turn(tok):
    ids, mask = render(tok, DEFAULT_TEMPLATE, prompt_response_messages("hi?", "lazy dog"))
    assert ids[0] == tok.token_to_id("<|user|>")
    trained = ids[mask == 1].tolist()
    assert trained == _enc(tok, "lazy dog") + [tok.token_to_id(EOT_TOKEN)]
    prompt = render_generation_prompt(tok, DEFAULT_TEMPLATE, [{"role": "user", "content": "hi?"}])
    assert ids[: prompt.size].tolist() == prompt.tolist(), "generation prompts must render as training did"
    assert prompt[-1 - len(_enc(tok, "\n"))] == tok.token_to_id("<|assistant|>")


def test_special_tokens_are_appended_single_ids_and_literals_stay_text(tok, tmp_path):
    base = load_tokenizer(make_tokenizer(tmp_path / "t.json"))
    n = base.get_vocab_size()
    ids = add_special_tokens(base, DEFAULT_TEMPLATE)
    assert [ids[t] for t in ("<|system|>", "<|user|>", "<|assistant|>")] == [n, n + 1, n + 2]
    assert base.get_vocab_size() == n + 3 and add_special_tokens(base, DEFAULT_TEMPLATE) == ids  # idempotent
    user_text = "write <|user|> or <|assistant|> or <|endoftext|> literally"
    out, mask = render(tok, DEFAULT_TEMPLATE, prompt_response_messages(user_text, "ok"))
    for t, count in (("<|user|>", 1), ("<|assistant|>", 1), (EOT_TOKEN, 1)):
        assert out.tolist().count(tok.token_to_id(t)) == count, t  # only the template's own markers
    assert tok.decode(out.tolist(), skip_special_tokens=False).count("<|user|>") == 2  # text + marker


def test_template_from_yaml_and_bad_templates(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text(
        'user_prefix: "[INST] "\nuser_suffix: " [/INST]"\nassistant_prefix: ""\n'
        'end_token: "<|end|>"\nspecial_tokens: ["[INST]", "[/INST]", "<|end|>"]\n'
    )
    t = load_template(path)
    assert t.end_token == "<|end|>" and t.special_tokens == ("[INST]", "[/INST]", "<|end|>")
    assert ChatTemplate.from_dict(t.to_dict()) == t
    path.write_text("user_prefx: x\n")
    with pytest.raises(ValueError, match="user_prefx"):
        load_template(path)
    with pytest.raises(ValueError, match="end_token"):
        ChatTemplate(end_token="<|stop|>")
    with pytest.raises(ValueError, match="must not list"):
        ChatTemplate(special_tokens=("<|user|>", EOT_TOKEN))


def test_custom_template_end_token_is_trained(tmp_path):
    t = ChatTemplate(user_prefix="[INST] ", user_suffix=" [/INST]", assistant_prefix="", end_token="<|end|>",
                     special_tokens=("[INST]", "[/INST]", "<|end|>"))  # fmt: skip
    tok = load_tokenizer(make_tokenizer(tmp_path / "t.json"))
    add_special_tokens(tok, t)
    ids, mask = render(tok, t, prompt_response_messages("q", "lazy"))
    assert ids[mask == 1].tolist() == _enc(tok, "lazy") + [tok.token_to_id("<|end|>")]
    assert ids[0] == tok.token_to_id("[INST]") and mask[0] == 0


# --- prepare_sft -------------------------------------------------------------------------------------
BAD_LINES = [
    ("{not json", "malformed_json"),
    ('["a list"]', "malformed_json"),
    ({"prompt": "only a prompt"}, "missing_fields"),
    ({"messages": [{"role": "user"}]}, "missing_fields"),
    (
        {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]},
        "unknown_role",
    ),
    (
        {"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}]},
        "non_string_content",
    ),
    ({"prompt": "p", "response": ["r"]}, "non_string_content"),
    ({"messages": []}, "empty_conversation"),
    ({"messages": [{"role": "user", "content": "x"}]}, "no_assistant_turn"),
    ({"messages": "hello"}, "malformed_conversation"),
]


def _with_bad_lines(records: list[dict]) -> tuple[list, dict[str, list[int]]]:
    """records with BAD_LINES spread among them (and a blank line); {kind: [line numbers]}."""
    lines: list = []
    where: dict[str, list[int]] = {}
    bad = iter(BAD_LINES)
    for i, r in enumerate(records):
        if i % 3 == 1 and (item := next(bad, None)) is not None:
            lines.append(item[0])
            where.setdefault(item[1], []).append(len(lines))
        lines.append(r)
    lines.append("   ")  # blank: not bad input
    return lines, where


def test_bad_input_counted_by_kind_and_logged_with_file_and_line(tmp_path, caplog):
    lines, where = _with_bad_lines(good_records(40))
    write_jsonl(tmp_path / "mixed.jsonl", lines)
    opts = SFTOptions(sources=[str(tmp_path / "mixed.jsonl")], out=str(tmp_path / "out"),
                      tokenizer=str(make_tokenizer(tmp_path / "tok.json")), val_fraction=0.25)  # fmt: skip
    with caplog.at_level(logging.WARNING):
        index = prepare_sft(opts)
    assert {k: n for k, n in index["bad_input"].items() if n} == {k: len(v) for k, v in where.items()}
    for kind, line_numbers in where.items():
        for line in line_numbers:
            assert any(f"mixed.jsonl line {line}: {kind}" in r.getMessage() for r in caplog.records), (
                kind,
                line,
            )
    assert sum(index["splits"][s]["n_samples"] for s in ("train", "val")) == 40


def test_strict_stops_at_the_first_bad_line_with_one_error_line(tmp_path, capsys):
    lines, where = _with_bad_lines(good_records(20))
    src = write_jsonl(tmp_path / "mixed.jsonl", lines)
    tok = make_tokenizer(tmp_path / "tok.json")
    with pytest.raises(SystemExit) as exc:
        main(["--source", str(src), "--out", str(tmp_path / "out"), "--tokenizer", str(tok), "--strict"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    first = min(line for lines_ in where.values() for line in lines_)
    assert len(err) == 1 and f"mixed.jsonl line {first}" in err[0] and "malformed_json" in err[0]
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_too_long_samples_are_cut_or_dropped_and_counted(tmp_path):
    records = good_records(30)
    records.append({"prompt": "the lazy dog " * 200, "response": "short"})  # a cut leaves only prompt
    records.append({"prompt": "q", "response": "the lazy dog " * 200})  # a cut keeps response tokens
    out, index = prepare_dir(tmp_path, records, max_length=64)
    tok = load_tokenizer(out / "tokenizer.json")
    full = [render(tok, DEFAULT_TEMPLATE, _messages(r)) for r in records]
    long = [mask for ids, mask in full if ids.size > 64]
    assert index["dropped_too_long"] == sum(not m[1:64].any() for m in long) == 1
    assert index["truncated"] == sum(bool(m[1:64].any()) for m in long) >= 2
    samples = {
        meta["id"]: (t, m) for split in ("train", "val") for t, m, meta in read_samples(out, index, split)
    }
    assert len(samples) == len(records) - 1 and f"chats.jsonl.gz:{len(records) - 1}" not in samples
    for line, (ids, mask) in enumerate(full, start=1):
        if f"chats.jsonl.gz:{line}" in samples:
            t, m = samples[f"chats.jsonl.gz:{line}"]
            assert t.tolist() == ids[:64].tolist() and m.tolist() == mask[:64].tolist()
    assert index["dropped_untrainable"] == 0


def test_index_fields_shards_and_split(tmp_path):
    records = good_records(60)
    out, index = prepare_dir(tmp_path, records, shard_max_tokens=400)
    tok = load_tokenizer(out / "tokenizer.json")
    assert (
        index["kind"] == "sft" and index["vocab_size"] == tok.get_vocab_size() == index["base_vocab_size"] + 3
    )
    assert index["eot_id"] == tok.token_to_id(EOT_TOKEN)
    assert index["special_tokens"]["<|user|>"] == tok.token_to_id("<|user|>")
    assert ChatTemplate.from_dict(index["template"]) == DEFAULT_TEMPLATE
    assert index["dtype"] == "uint16" and index["truncated"] == index["dropped_too_long"] == 0
    assert len(index["splits"]["train"]["shards"]) >= 3, "small shards: several per split"
    seen = []
    for split in ("train", "val"):
        entry = index["splits"][split]
        samples = read_samples(out, index, split)
        assert entry["n_samples"] == len(samples) and entry["n_tokens"] == sum(t.size for t, _, _ in samples)
        assert entry["n_trained"] == sum(int(m.sum()) for _, m, _ in samples)
        assert [n for s in entry["shards"] for n in s["lengths"]] == [t.size for t, _, _ in samples]
        for shard in entry["shards"]:
            assert hashlib.sha256((out / shard["file"]).read_bytes()).hexdigest() == shard["sha256"]
        for tokens, mask, meta in samples:
            assert tokens.dtype == np.uint16 and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
            assert split_of(meta["id"], 0.25) == split
            seen.append(meta["id"])
    assert sorted(seen) == sorted(f"chats.jsonl.gz:{i}" for i in range(1, 61))
    # The same input renders the same ids as render() does.
    line = int(samples[0][2]["id"].split(":")[1])
    ids, mask = render(tok, DEFAULT_TEMPLATE, _messages(records[line - 1]))
    assert ids.tolist() == samples[0][0].tolist() and mask.tolist() == samples[0][1].tolist()


def _messages(record: dict) -> list[dict]:
    return (
        record["messages"]
        if "messages" in record
        else prompt_response_messages(record["prompt"], record["response"])
    )


def test_output_is_reproducible_and_the_seed_only_orders(tmp_path):
    records = good_records(40)
    _, a = prepare_dir(tmp_path / "a", records)
    _, b = prepare_dir(tmp_path / "b", records)
    out_c, c = prepare_dir(tmp_path / "c", records, seed=4)
    shas = lambda index: [s["sha256"] for split in ("train", "val") for s in index["splits"][split]["shards"]]  # noqa: E731
    assert shas(a) == shas(b) and a["fingerprint"] == b["fingerprint"]
    assert shas(a) != shas(c)
    for split in ("train", "val"):
        ids_a = [m["id"] for _, _, m in read_samples(tmp_path / "a" / "out", a, split)]
        ids_c = [m["id"] for _, _, m in read_samples(out_c, c, split)]
        assert sorted(ids_a) == sorted(ids_c) and ids_a != ids_c


def test_rerun_replaces_an_sft_dir_and_refuses_other_dirs(tmp_path, capsys):
    out, index = prepare_dir(tmp_path, good_records(30))
    src, tok = tmp_path / "chats.jsonl.gz", tmp_path / "tok.json"
    main(["--source", str(src), "--out", str(out), "--tokenizer", str(tok), "--val-fraction", "0.25"])
    assert "train:" in capsys.readouterr().out
    assert json.loads((out / "index.json").read_text())["fingerprint"] != index["fingerprint"]  # another seed
    assert not list(tmp_path.glob(".out.*"))
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit) as exc:
        main(["--source", str(src), "--out", str(other), "--tokenizer", str(tok)])
    assert exc.value.code == 2 and "not an SFT prepared directory" in capsys.readouterr().err
    assert (other / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--source", "{tmp}/missing.jsonl"], "does not exist"),
        (["--tokenizer", "{tmp}/missing.json"], "does not exist"),
        (["--max-length", "1"], "--max-length"),
        (["--val-fraction", "0.9"], "--val-fraction"),
        (["--template", "{tmp}/missing.yaml"], "--template"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(tmp_path, capsys, args, message):
    src = write_jsonl(tmp_path / "c.jsonl", good_records(4))
    tok = make_tokenizer(tmp_path / "tok.json")
    base = {"--source": str(src), "--out": str(tmp_path / "out"), "--tokenizer": str(tok)}
    for flag, value in zip(args[::2], args[1::2], strict=True):
        base[flag] = value.format(tmp=tmp_path)
    with pytest.raises(SystemExit) as exc:
        main([x for kv in base.items() for x in kv])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and message in err[0] and err[0].startswith("error:")
