"""Chat templates: conversations -> token ids and a per-token loss mask, for supervised fine-tuning.

A conversation is a list of messages `{"role": "system"|"user"|"assistant", "content": str}`. A template
gives each role a prefix and a suffix (template text that may hold the template's special tokens) and names
the end token that closes every assistant turn. The default renders

    <|system|>\\n{system}\\n<|user|>\\n{user}\\n<|assistant|>\\n{assistant}<|endoftext|><|user|>\\n...

Rendering builds a list of segments (template text, a special token, or message content), tokenizes every
text segment separately and concatenates the ids: each token then belongs to exactly one segment, so the
loss mask is exact (1 on the tokens of assistant content and on the end token after it, 0 on everything
else), and no BPE merge can cross from a prompt into a response. The price: the ids may differ from
tokenizing the whole rendered string at once (a merge across a segment border is never made), so generation
must build its prompts with the same function (`render_generation_prompt`).

Special tokens never come from text: template text is split on the template's special tokens, which map to
their ids directly; message content is tokenized with `encode_special_tokens` on (tokenizer.py sets it at
load time), so a user who writes a literal `<|user|>` or `<|endoftext|>` gets text, not a turn marker.

A template is a flat dataclass (one YAML file per template, e.g. for a Hydra config group later):
`load_template(path)` reads one, `ChatTemplate.to_dict()` is what index.json records.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import NamedTuple

import numpy as np
import yaml
from tokenizers import AddedToken, Tokenizer

from data_pipeline.tokenizer import EOT_TOKEN, eot_id

ROLES = ("system", "user", "assistant")


class BadConversation(ValueError):
    """A record that is not a conversation the template can render; `kind` says how (a bad-input kind)."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind


@dataclass(frozen=True)
class ChatTemplate:
    """Per-role prefix/suffix text, the special tokens that text uses, and the token ending assistant turns."""

    system_prefix: str = "<|system|>\n"
    system_suffix: str = "\n"
    user_prefix: str = "<|user|>\n"
    user_suffix: str = "\n"
    assistant_prefix: str = "<|assistant|>\n"
    """Not trained: the model is given it (generation prompts end with it)."""
    assistant_suffix: str = ""
    """Template text after the end token (not trained: generation stops at the end token)."""
    end_token: str = EOT_TOKEN
    """Closes every assistant turn and is trained: the model learns to stop."""
    special_tokens: tuple[str, ...] = ("<|system|>", "<|user|>", "<|assistant|>")
    """Added to the tokenizer in this order, after its vocabulary (EOT_TOKEN must be there already)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "special_tokens", tuple(self.special_tokens))  # a YAML list
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name != "special_tokens" and not isinstance(value, str):
                raise ValueError(f"chat template field {f.name} must be a string, got {value!r}")
        tokens = self.special_tokens
        if not all(isinstance(t, str) and t for t in tokens) or len(set(tokens)) != len(tokens):
            raise ValueError(
                f"chat template special_tokens must be distinct non-empty strings, got {tokens!r}"
            )
        if EOT_TOKEN in tokens:
            raise ValueError(
                f"chat template special_tokens must not list {EOT_TOKEN!r}: the tokenizer has it"
            )
        if self.end_token != EOT_TOKEN and self.end_token not in tokens:
            raise ValueError(
                f"chat template end_token {self.end_token!r} must be {EOT_TOKEN!r} or one of special_tokens"
            )

    def prefix(self, role: str) -> str:
        return getattr(self, f"{role}_prefix")

    def suffix(self, role: str) -> str:
        return getattr(self, f"{role}_suffix")

    def to_dict(self) -> dict:
        """JSON/YAML-able fields (what index.json records; load_template reads the same keys)."""
        d = asdict(self)
        d["special_tokens"] = list(self.special_tokens)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ChatTemplate:
        """A template from to_dict()'s keys (missing keys take the default); unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown chat template keys {unknown} (known: {sorted(known)})")
        return cls(**d)


DEFAULT_TEMPLATE = ChatTemplate()


def load_template(path: str | Path) -> ChatTemplate:
    """A ChatTemplate from a YAML file of its fields; ValueError names the file on any problem."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"chat template {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError("not a mapping of template fields")
        return ChatTemplate.from_dict(data)
    except (yaml.YAMLError, ValueError, TypeError) as e:
        raise ValueError(f"chat template {str(path)!r}: {e}") from None


# --- tokenizer -------------------------------------------------------------------------------------
def add_special_tokens(tok: Tokenizer, template: ChatTemplate) -> dict[str, int]:
    """Add the template's special tokens to tok (in place, in order, after its vocabulary); their ids.

    A token tok has already (a tokenizer written by an earlier prepare_sft) keeps its id.
    """
    eot_id(tok)  # the base tokenizer must have <|endoftext|>
    missing = [t for t in template.special_tokens if tok.token_to_id(t) is None]
    if missing:
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
    return special_token_ids(tok, template)


def special_token_ids(tok: Tokenizer, template: ChatTemplate) -> dict[str, int]:
    """Ids of the template's special tokens and its end token in tok; ValueError if one is missing."""
    ids = {}
    for t in (*template.special_tokens, template.end_token):
        idx = tok.token_to_id(t)
        if idx is None:
            raise ValueError(f"tokenizer has no {t!r} token: add the template's tokens (prepare_sft does)")
        ids[t] = idx
    return ids


# --- conversations -----------------------------------------------------------------------------------
def check_messages(messages: object) -> list[dict]:
    """messages if it is a renderable conversation, else BadConversation naming the kind of problem."""
    if not isinstance(messages, list):
        raise BadConversation(
            "malformed_conversation", f"'messages' is a {type(messages).__name__}, not a list"
        )
    if not messages:
        raise BadConversation("empty_conversation", "'messages' is empty")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise BadConversation(
                "malformed_conversation", f"message {i} is a {type(m).__name__}, not an object"
            )
        if "role" not in m or "content" not in m:
            raise BadConversation("missing_fields", f"message {i} lacks 'role' or 'content'")
        if m["role"] not in ROLES:
            raise BadConversation("unknown_role", f"message {i} has role {m['role']!r}, not one of {ROLES}")
        if not isinstance(m["content"], str):
            raise BadConversation(
                "non_string_content", f"message {i} content is a {type(m['content']).__name__}, not a string"
            )
    if not any(m["role"] == "assistant" for m in messages):
        raise BadConversation("no_assistant_turn", "no assistant message to train on")
    return messages


def prompt_response_messages(prompt: str, response: str) -> list[dict]:
    """A prompt/response pair as one user turn and one assistant turn."""
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


class Segment(NamedTuple):
    """A run of the rendered conversation: text to tokenize, or one special token; trained or not."""

    text: str
    special: bool
    trained: bool


def _template_text(template: ChatTemplate, text: str) -> list[Segment]:
    """Template text split on its special tokens (untrained)."""
    if not text:
        return []
    specials = sorted((*template.special_tokens, template.end_token), key=len, reverse=True)
    parts = re.split("(" + "|".join(map(re.escape, specials)) + ")", text)
    return [Segment(p, p in specials, False) for p in parts if p]


def segments(
    template: ChatTemplate, messages: Sequence[dict], generation_prompt: bool = False
) -> list[Segment]:
    """The conversation as segments: per turn prefix, content, [end token], suffix.

    Trained: assistant content and the end token after it. generation_prompt: end with the assistant prefix.
    """
    out: list[Segment] = []
    for m in messages:
        role = m["role"]
        out += _template_text(template, template.prefix(role))
        assistant = role == "assistant"
        if m["content"]:
            out.append(Segment(m["content"], False, assistant))
        if assistant:
            out.append(Segment(template.end_token, True, True))
        out += _template_text(template, template.suffix(role))
    if generation_prompt:
        out += _template_text(template, template.prefix("assistant"))
    return out


def encode_segments(
    tok: Tokenizer, batch: Sequence[Sequence[Segment]]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(ids int64, mask uint8) per conversation; all text segments of the batch go through one encode_batch."""
    texts = [s.text for segs in batch for s in segs if not s.special]
    encoded = iter(tok.encode_batch(texts, add_special_tokens=False)) if texts else iter(())
    special_ids: dict[str, int] = {}
    out = []
    for segs in batch:
        ids: list[int] = []
        mask: list[int] = []
        for s in segs:
            if s.special:
                if s.text not in special_ids:
                    idx = tok.token_to_id(s.text)
                    if idx is None:
                        raise ValueError(
                            f"tokenizer has no {s.text!r} token: add the template's tokens first"
                        )
                    special_ids[s.text] = idx
                piece = [special_ids[s.text]]
            else:
                piece = next(encoded).ids
            ids += piece
            mask += [int(s.trained)] * len(piece)
        out.append((np.array(ids, dtype=np.int64), np.array(mask, dtype=np.uint8)))
    return out


def render(tok: Tokenizer, template: ChatTemplate, messages: Sequence[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and loss mask (1 on assistant content and each closing end token) of one conversation."""
    return encode_segments(tok, [segments(template, check_messages(list(messages)))])[0]


def render_generation_prompt(tok: Tokenizer, template: ChatTemplate, messages: Sequence[dict]) -> np.ndarray:
    """Token ids of a conversation so far followed by the assistant prefix: what generation continues."""
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise BadConversation("malformed_conversation", f"message {i} is not a role/content message")
    return encode_segments(tok, [segments(template, messages, generation_prompt=True)])[0][0]
