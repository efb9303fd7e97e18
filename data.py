"""Text to ids: tokenizers, prompt templates, judgment triples, the triple builder, the built-in task.

model.py turns ids into logits and cut_loss.py turns response log-probs into a loss; this file is everything
before the model: read (instruction, response, judgment) triples, tokenize them into the Align-P, Align-N and
Misalign sequences of the paper (docs/cut.md), and pad them into one batch.
"""
import ast
import base64
import hashlib
import itertools
import json
import random
import re
import struct
import sys
import unicodedata
import zlib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import NamedTuple

import tiktoken
import torch

from model import Transformer

# ----------------------------------------------------------------------------- tokenizers and templates
PLAIN = ("Below is an instruction that describes a task. Write a response that appropriately completes the request."
         "\n\n### Instruction:\n{instruction}\n\n### Response:\n")
JUDGED = ("Below is an instruction that describes a task. Write a response to the instruction and the response should"
          " match the corresponding judgment.\n\n### Instruction:\n{instruction}\n\n### Judgment:\n{judgment}\n\n"
          "### Response:\n")
# chat format -> (special token that reveals it, its end-of-turn token, one user turn then the assistant's header).
# Llama 2's [INST] is text (the chat template reveals it); text between special tokens gets SentencePiece's "▁".
CHAT_FORMATS = {
    "llama3": ("<|start_header_id|>", "<|eot_id|>", "<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\n"),
    "chatml": ("<|im_start|>", "<|im_end|>", "<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"),
    "mistral": ("[INST]", "</s>", "[INST]{content}[/INST]"),
    "llama2": (None, "</s>", "[INST] {content} [/INST]"),  # <<SYS>> would hold a system prompt: ours have none
}
CHATML_TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
                   "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
END_OF_TEXT = ("<|end_of_text|>", "<|endoftext|>", "<|eos|>", "<|eom_id|>", "</s>")
SUPPORTED = ("supported: a byte-level BPE tokenizer.json (optionally NFC), SentencePiece BPE with byte fallback "
             "(tokenizer.model, or its tokenizer.json of Llama 2 and Mistral) and Meta's Llama 3 tokenizer.model")
SP_NORMALIZER = {"type": "Sequence", "normalizers": [  # a dummy prefix, spaces as "▁": SentencePiece's own
    {"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIALS = [  # ids 128000.., Llama 3.1 names, 256 in all
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eom_id|>", "<|eot_id|>", "<|python_tag|>", *(f"<|reserved_special_token_{i}|>" for i in range(3, 248))]


def _byte_chars():
    """GPT-2's byte -> printable character map, in which byte-level BPE vocabularies are written."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in printable]
    return {b: chr(c) for b, c in zip(printable + rest, printable + [256 + i for i in range(len(rest))])}


def _unencodable(ranks, where):
    """A pattern for the characters holding a byte the vocabulary lacks (tiktoken would panic on them). tokenizers
    drops such a byte; we drop the character: the same for ASCII, and otherwise only unassigned code points differ."""
    spans = []
    for b in (b for b in range(256) if bytes([b]) not in ranks):
        if 0x80 <= b < 0xC0:
            raise ValueError(f"{where}: the vocabulary lacks the byte {b:#x}; {SUPPORTED}")
        if b < 0x80 or 0xC2 <= b <= 0xF4:  # C0, C1 and F5-FF never occur in UTF-8
            # lead byte -> the code points it starts: 1, 2, 3 or 4 UTF-8 bytes
            shift, low, first = (0, b, 0) if b < 0x80 else (6, b - 0xC0, 0x80) if b < 0xE0 else (
                (12, b - 0xE0, 0x800) if b < 0xF0 else (18, b - 0xF0, 0x10000))
            lo, hi = max(low << shift, first), min(((low + 1) << shift) - 1, 0x10FFFF)
            spans.append(f"{re.escape(chr(lo))}-{re.escape(chr(hi))}")
    return re.compile(f"[{''.join(spans)}]") if spans else None


def _parse(file, data, parse):
    try:
        return parse(data)
    except (ValueError, LookupError, struct.error) as e:  # bad JSON, base64 or protobuf, a malformed line, truncation
        raise ValueError(f"{file}: cannot read it ({e}); {SUPPORTED}") from None


def _meta_ranks(data):
    """Meta's tokenizer.model: one "base64(token bytes) rank" per line."""
    return {base64.b64decode(token, validate=True): int(rank) for token, rank in map(bytes.split, data.splitlines())}


def _varint(buf, i):
    n = shift = 0
    while buf[i] & 0x80:
        n, i, shift = n | (buf[i] & 0x7F) << shift, i + 1, shift + 7
    return n | buf[i] << shift, i + 1


def _proto(buf):
    """{field: [values]} of a protobuf message: varints as ints, 32-bit fields as floats, the others as bytes."""
    fields, i = {}, 0
    while i < len(buf):
        key, i = _varint(buf, i)
        kind = key & 7  # the wire type: 0 a varint, 1 and 5 eight and four bytes, 2 a length and as many bytes
        size, i = _varint(buf, i) if kind == 2 else ({0: 0, 1: 8, 5: 4}[kind], i)
        value, i = _varint(buf, i) if kind == 0 else (buf[i:i + size], i + size)
        fields.setdefault(key >> 3, []).append(struct.unpack("<f", value)[0] if kind == 5 else value)
    if i > len(buf):
        raise ValueError("truncated")
    return fields


def _sp_model(data):
    """{id: (text, score, type)}, trainer spec and normalizer spec of a SentencePiece model (a protobuf)."""
    model = _proto(data)
    pieces = {i: (p.get(1, [b""])[0].decode(), *p.get(2, [0.0]), *p.get(3, [1]))
              for i, p in enumerate(map(_proto, model.get(1, [])))}
    return pieces, *(_proto(model.get(n, [b""])[0]) for n in (2, 3))


def _sp_parts(pieces, bos_name, where):
    """(ranks, special tokens, split pattern, BOS name, NFC, (ids of each rank, bytes of each id)) of SentencePiece BPE:
    pieces {id: (text, score, type)}, type 1 normal, 2 unknown, 3 control, 6 byte. SentencePiece merges the pair whose
    piece scores highest, tiktoken the pair whose bytes rank lowest: rank the characters' UTF-8 prefixes first, then the
    longer pieces by falling score (ties by id). A rank that is no piece stands for its byte tokens (byte fallback)."""
    ids = {p.encode(): i for i, (p, _, kind) in pieces.items() if kind == 1}
    byte_ids = {int(p[3:5], 16): i for i, (p, _, kind) in pieces.items() if kind == 6}
    if sorted(byte_ids) != list(range(256)):
        raise ValueError(f"{where}: SentencePiece without the 256 byte fallback tokens <0x00>..<0xFF>; {SUPPORTED}")
    chars = {bytes([b]) for b in range(256)} | {c.encode()[:k] for p in ids for c in p.decode() for k in range(2, 5)}
    longer = sorted((p for p in ids if len(p.decode()) > 1), key=lambda p: (-pieces[ids[p]][1], ids[p]))
    order = sorted(chars) + longer
    table = [[ids[b]] if b in ids else [byte_ids[x] for x in b] for b in order]
    text = {i: p.replace("▁", " ").encode() if kind == 1 else bytes([int(p[3:5], 16)]) if kind == 6 else b""
            for i, (p, _, kind) in pieces.items()}
    return ({b: r for r, b in enumerate(order)}, {p: i for i, (p, _, kind) in pieces.items() if kind in (2, 3)},
            r"[\s\S]+", bos_name, False, (table, text))  # no pre-tokenizer: the whole text is one piece


def _hf_parts(spec, where):
    """The parts (as _sp_parts) of a byte-level or a SentencePiece BPE tokenizer.json, else ValueError."""
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    post = spec.get("post_processor") or {}  # BOS: a TemplateProcessing that puts a special token first
    firsts = [p["single"][0] for p in post.get("processors", [post]) if p.get("type") == "TemplateProcessing"]
    bos = (firsts[0].get("SpecialToken") or {}).get("id") if firsts else None
    specials = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
    merges = ["".join(m.split(" ") if isinstance(m, str) else m) for m in model.get("merges", [])]
    if model.get("byte_fallback"):  # SentencePiece BPE in Hugging Face's form (Llama 2, Mistral v0.1)
        if model.get("type") != "BPE" or spec.get("normalizer") != SP_NORMALIZER or pre:  # Metaspace: " a" != "▁▁a"
            raise ValueError(f"{where}: byte fallback, but not SentencePiece's normalizer alone (Prepend and Replace "
                             f"with '▁'); remove it to read the tokenizer.model beside it; {SUPPORTED}")
        score = {m: -k for k, m in reversed(list(enumerate(merges)))}  # a piece ranks as its first merge
        pieces = {i: (p, score.get(p, -len(merges)), 6 if re.fullmatch("<0x[0-9A-F]{2}>", p) else 1)
                  for p, i in model["vocab"].items()}
        return _sp_parts(pieces | {i: (p, 0.0, 3) for p, i in specials.items()}, bos, where)
    steps = (pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]) or [{}]
    split = steps[0] if len(steps) == 2 and steps[0].get("type") == "Split" else {}
    byte_level = steps[-1] if steps[-1].get("type") == "ByteLevel" and len(steps) == (2 if split else 1) else {}
    pattern = GPT2_SPLIT if not split else split.get("pattern", {}).get("Regex")
    if (model.get("type") != "BPE" or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix")
            or spec.get("normalizer") not in (None, {"type": "NFC"}) or not byte_level or not pattern
            or byte_level.get("add_prefix_space") or byte_level.get("use_regex", True) == bool(split)  # one split
            or split and (split.get("behavior") != "Isolated" or split.get("invert"))):
        raise ValueError(f"{where}: not a byte-level BPE tokenizer ({model.get('type')}, pre-tokenizer "
                         f"{pre.get('type')}); {SUPPORTED}")
    byte_of = {c: b for b, c in _byte_chars().items()}
    try:
        ranks = {bytes(byte_of[c] for c in t): i for t, i in model["vocab"].items() if t not in specials}
        merged = [ranks[bytes(byte_of[c] for c in m)] for m in merges]
    except KeyError as e:
        raise ValueError(f"{where}: vocab or merges hold {e} that is not a byte-level token; {SUPPORTED}") from None
    # tiktoken merges by the rank of the merged token: the same as merges order only if that order follows the ids
    if any(b < a for a, b in zip(merged, merged[1:])):
        raise ValueError(f"{where}: the merges do not follow the vocab ids; {SUPPORTED}")
    return ranks, specials, pattern, bos, spec.get("normalizer") is not None


@dataclass
class Tokenizer:
    """tiktoken BPE + special tokens. encode() never parses special tokens: user text cannot inject a control token.
    eos_id is the chat format's end-of-turn token when the vocabulary has one, else the end-of-text token."""
    enc: tiktoken.Encoding
    n_vocab: int
    special: dict  # special token text -> id
    bos_id: int | None  # prepended to every sequence (None: the tokenizer adds none, as SmolLM2)
    eos_id: int
    stop_ids: list
    chat: str | None
    instruct: bool  # the checkpoint ships a chat template
    files: dict  # file name -> bytes, written by save()
    drop: re.Pattern | None  # characters the vocabulary cannot encode
    nfc: bool  # text is NFC-normalized first (Qwen)
    sp: tuple | None  # SentencePiece: (the ids each tiktoken rank stands for, the bytes of each id)

    @classmethod
    def _build(cls, name, eos_name, template, files, ranks, special, pattern, bos_name, nfc=False, sp=None):
        chat = next((c for c, (mark, _, _) in CHAT_FORMATS.items() if mark in special), None)
        if chat is None and ("[INST]" in template or sp and not template):  # Llama 2's, also for Meta's layout
            chat = "llama2"
        ends = [n for n in (chat and CHAT_FORMATS[chat][1], eos_name, *END_OF_TEXT) if n in special]
        if not ends or bos_name is not None and bos_name not in special:
            raise ValueError(f"{name}: no end-of-text token or an unknown BOS token {bos_name!r}")
        enc = tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks, special_tokens={} if sp else special)
        return cls(enc, max(sp[1]) + 1 if sp else enc.n_vocab, special, special.get(bos_name), special[ends[0]],
                   sorted({special[n] for n in ends}), chat, bool(template), files, _unencodable(ranks, name), nfc, sp)

    @classmethod
    def from_pretrained(cls, path):
        path = Path(path)
        if path.is_dir():
            # a SentencePiece tokenizer.model first: its tokenizer.json may be the Metaspace form that we refuse
            found = [path / n for n in ("tokenizer.model", "tokenizer.json", "original/tokenizer.model")
                     if (path / n).is_file()]
            if not found:
                raise FileNotFoundError(f"{path}: no tokenizer.model, tokenizer.json or original/tokenizer.model; "
                                        f"{SUPPORTED}")
            path = found[0]
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such tokenizer file; {SUPPORTED}")
        data, here = path.read_bytes(), path.parent
        extra = {n: (here / n).read_bytes() for n in ("tokenizer_config.json", "chat_template.jinja")
                 if (here / n).is_file()}
        config = _parse(here / "tokenizer_config.json", extra.get("tokenizer_config.json", b"{}"), json.loads)
        eos = config.get("eos_token")
        eos = eos.get("content") if isinstance(eos, dict) else eos
        template = str(config.get("chat_template") or extra.get("chat_template.jinja", b"").decode())
        files = {"tokenizer.json" if path.suffix == ".json" else "tokenizer.model": data, **extra}
        if path.suffix == ".json":
            return cls._build(str(path), eos, template, files, *_hf_parts(_parse(path, data, json.loads), path))
        if data[:1] == b"\n":  # a protobuf's field 1: SentencePiece's pieces (Llama 3's file is base64 text)
            pieces, trainer, norm = _parse(path, data, _sp_model)
            found = [*trainer.get(3, [1]), *trainer.get(35, [0]), *trainer.get(24, [0]), *norm.get(2, [b""]),
                     *(norm.get(n, [1])[0] for n in (3, 4, 5)), any(kind in (4, 5) for _, _, kind in pieces.values())]
            if found != [2, 1, 0, b"", 1, 0, 1, False]:  # fields of sentencepiece_model.proto, in the message's order
                raise ValueError(f"{path}: a SentencePiece model, but not BPE with byte fallback, no normalization, "
                                 f"a dummy prefix, whitespace kept and no user-defined pieces; {SUPPORTED}")
            bos = pieces.get(trainer.get(41, [1])[0], [None])[0]
            return cls._build(str(path), eos, template, files, *_sp_parts(pieces, bos, path))
        ranks = _parse(path, data, _meta_ranks)
        special = {t: len(ranks) + i for i, t in enumerate(LLAMA3_SPECIALS)}
        return cls._build(str(path), eos, template, files, ranks, special, LLAMA3_SPLIT, "<|begin_of_text|>")

    @classmethod
    def byte_level(cls):
        """Ids 0..255 are the bytes, then <|bos|> 256, <|eos|> 257, <|im_start|> 258, <|im_end|> 259: a byte-level BPE
        with no merges (tokenizer.json), and ChatML, whose short prompts keep the built-in task cheap on a CPU."""
        names = ("<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>")
        byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
        spec = {"added_tokens": [{"id": 256 + i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                                  "normalized": False, "special": True} for i, t in enumerate(names)],
                "pre_tokenizer": byte_level, "decoder": byte_level,
                "post_processor": {"type": "TemplateProcessing", "pair": [], "single": [
                    {"SpecialToken": {"id": names[0], "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                    "special_tokens": {names[0]: {"id": names[0], "ids": [256], "tokens": [names[0]]}}},
                "model": {"type": "BPE", "vocab": {c: b for b, c in _byte_chars().items()}, "merges": []}}
        files = {"tokenizer.json": json.dumps(spec, ensure_ascii=False).encode(),
                 "tokenizer_config.json": json.dumps({"bos_token": names[0], "eos_token": names[3],
                                                      "chat_template": CHATML_TEMPLATE}).encode()}
        return cls._build("byte_level", names[3], CHATML_TEMPLATE, files, *_hf_parts(spec, "byte_level"))

    def encode(self, text):
        text = unicodedata.normalize("NFC", text) if self.nfc else text
        if self.sp:  # SentencePiece: a dummy prefix, spaces as "▁", then the ids each rank stands for
            ranks = self.enc.encode_ordinary("▁" + text.replace(" ", "▁") if text else "")
            return [i for r in ranks for i in self.sp[0][r]]
        return self.enc.encode_ordinary(self.drop.sub("", text) if self.drop else text)

    def decode(self, ids):
        if self.sp:  # the bytes of each id, less SentencePiece's dummy prefix
            return b"".join(self.sp[1][i] for i in ids).decode(errors="replace").removeprefix(" ")
        return self.enc.decode(list(ids))

    def save(self, directory):
        Path(directory).mkdir(parents=True, exist_ok=True)
        for name, data in self.files.items():
            Path(directory, name).write_bytes(data)


def use_chat(tok, chat):
    """The programs' `chat` setting as a bool: 'auto' (when the checkpoint ships a chat template), 'yes' or 'no'."""
    return tok.instruct if chat == "auto" else chat == "yes"


def load_checkpoint(path, dtype=torch.float32, device="cpu"):
    """(model, tokenizer) of a checkpoint directory: Hugging Face, Meta, or a train.py out_dir."""
    if not Path(path).is_dir():
        raise FileNotFoundError(f"{path}: no such checkpoint directory")
    model = Transformer.from_pretrained(path, dtype=dtype, device=device)  # first, as it finishes an interrupted save
    tok = Tokenizer.from_pretrained(path)
    if tok.n_vocab > model.cfg.vocab_size:
        raise ValueError(f"{path}: the tokenizer has {tok.n_vocab} tokens, the model's vocab_size is only "
                         f"{model.cfg.vocab_size}")
    return model, tok


def prompt_ids(tok, instruction, judgment=None, chat=False):
    """[BOS] + PLAIN (judgment None) or JUDGED. chat=True: one user turn of the model's chat format instead, holding
    the instruction, then "\\n\\n### Judgment:\\n" + the judgment if one is given, then the assistant's header."""
    bos = [] if tok.bos_id is None else [tok.bos_id]
    if not chat:
        text = PLAIN.format(instruction=instruction) if judgment is None else JUDGED.format(
            instruction=instruction, judgment=judgment)
        return bos + tok.encode(text)
    if tok.chat is None:
        raise ValueError(f"chat=True, but the tokenizer has no chat format of {', '.join(CHAT_FORMATS)}; set chat 'no'")
    content = instruction if judgment is None else f"{instruction}\n\n### Judgment:\n{judgment}"
    # split the format at its special tokens first, so that the user's text is only ever encoded as text
    parts = re.split(r"(<\|\w+\|>|\[/?INST\])", CHAT_FORMATS[tok.chat][2])
    runs = itertools.groupby(parts, lambda p: p in tok.special)  # special tokens, and the text between them
    return bos + [i for special, run in runs for i in ([tok.special[p] for p in run] if special else
                                                        tok.encode("".join(run).replace("{content}", content)))]


# ----------------------------------------------------------------------------- triples and the triple builder
LOSS_MODES = ("cut", "sft", "sft_all", "hindsight", "forward")  # each trains on its own sequences (encode_triples)
POSITIVE_JUDGMENT = "Your response to the instruction is satisfactory."
JUDGMENT_HEADER = "\n\n### Judgment:\n"  # forward prediction: the judgment is trained after [x, y]


FAILED_JUDGE = "$ERROR$"  # the authors' data marks a failed judge call so: no judgment to train on


@dataclass(frozen=True)
class Triple:
    instruction: str
    response: str
    judgment: str | None  # None: the response is acceptable


def _triple(rec, where: str) -> Triple | None:
    """One record of any supported format as a Triple; None for a failed judge call ($ERROR$)."""
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}")

    def field(name, nullable=False):
        if name not in rec:
            raise ValueError(f"{where}: missing field '{name}'")
        value = rec[name]
        if not (isinstance(value, str) or (nullable and value is None)):
            raise ValueError(f"{where}: field '{name}' must be a string{' or null' if nullable else ''}, "
                             f"got {type(value).__name__}")
        return value

    if "question" in rec:  # Shepherd: every answer is flawed, the feedback says why
        if not field("feedback").strip():
            raise ValueError(f"{where}: field 'feedback' is empty (a Shepherd answer needs its critique)")
        return None if rec["feedback"] == FAILED_JUDGE else Triple(field("question"), field("answer"), rec["feedback"])
    if "output" in rec:  # the CUT authors' release (Alpaca style)
        instruction, response, judgment = field("instruction"), field("output"), field("judgment", nullable=True)
        extra = field("input", nullable=True) if "input" in rec else None
        score = rec.get("score")
        if score is not None and (isinstance(score, bool) or not isinstance(score, (int, float))):
            raise ValueError(f"{where}: field 'score' must be a number or null, got {type(score).__name__}")
        if judgment == FAILED_JUDGE:
            return None
        if not judgment or judgment.startswith("Perfect") or (score is not None and score >= 7):
            judgment = None
        return Triple(instruction + "\n" + extra if extra else instruction, response, judgment)
    if "response" in rec:
        judgment = field("judgment", nullable=True) or None
        return None if judgment == FAILED_JUDGE else Triple(field("instruction"), field("response"), judgment)
    raise ValueError(f"{where}: unknown record, expected the fields instruction/input/output/judgment, "
                     f"question/answer/feedback or instruction/response/judgment; got {sorted(rec)}")


def data_hash(data):
    """sha256 of a triples file's bytes ('builtin' for the built-in task): a resumed run, or an evaluation, checks
    that it reads the run's own data."""
    return "builtin" if data == "builtin" else hashlib.sha256(Path(data).read_bytes()).hexdigest()


def read_text(path):
    """A UTF-8 text file, without a byte-order mark; one clear error naming the file otherwise."""
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def load_triples(path, verbose=True) -> list[Triple]:
    """Triples from a JSON list or a JSONL file of the authors' release, Shepherd's, or plain records."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such triples file")
    text = read_text(path)
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        if text.lstrip().startswith("["):
            raise ValueError(f"{path}: not a valid JSON list ({e})") from None
        records = None  # JSONL, a record per line, is not one JSON value
    if isinstance(records, dict) and "\n" in text.strip():
        raise ValueError(f"{path}: one JSON object; expected a list of records, or JSONL (a record per line)")
    if isinstance(records, list):
        located = [(rec, f"{path}: record {i}") for i, rec in enumerate(records)]
    else:
        located = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    located.append((json.loads(line), f"{path}: line {n}"))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}: line {n}: not valid JSON ({e.msg})") from None
    parsed = [_triple(rec, where) for rec, where in located]
    triples = [t for t in parsed if t is not None]
    if not triples:
        raise ValueError(f"{path}: no usable triples in {len(located)} records")
    n_err, n_flawed = len(parsed) - len(triples), sum(t.judgment is not None for t in triples)
    if verbose:
        print(f"{path.name}: loaded {len(triples)} triples ({len(triples) - n_flawed} acceptable, {n_flawed} flawed), "
              f"dropped {n_err} with a failed judge call ({FAILED_JUDGE})")
    return triples


def split_triples(triples: list[Triple], val_frac: float = 0.1, seed: int = 0):
    """(train, val): a random permutation of the distinct triples, drawn from the seed alone (no global RNG state).
    Copies of a triple stay together, so that validation never holds a triple that training saw."""
    distinct = list(dict.fromkeys(triples))
    order = torch.randperm(len(distinct), generator=torch.Generator().manual_seed(seed)).tolist()
    val = {distinct[i] for i in order[:round(len(distinct) * val_frac)]}
    return [t for t in triples if t not in val], [distinct[i] for i in order if distinct[i] in val]


@dataclass
class Encoded:
    # (prompt ids, trained ids) of each sequence of one triple: first x -> y, then, if there is one, the
    # [x, j-] -> y row (cut) or the [x, y] -> j row (forward)
    rows: list[tuple[list[int], list[int]]]
    is_neg: bool


def _fit(prompt: list[int], trained: list[int], max_len: int, bos_id: int | None):
    """Cut the prompt from the left (keeping BOS) so that idx = (prompt + trained)[:-1] fits max_len."""
    budget = max_len + 1 - len(trained)  # prompt tokens allowed; at least one is needed to predict from
    if budget < 1:
        return None
    if len(prompt) <= budget:
        return prompt, trained
    head = [bos_id] if bos_id is not None and prompt[0] == bos_id else []
    keep = budget - len(head)
    return head + (prompt[-keep:] if keep else []), trained


def encode_triples(tok: Tokenizer, triples: list[Triple], mode: str, max_len: int, chat: bool = False,
                   verbose=True) -> list[Encoded]:
    """The sequences each loss mode trains on (docs/cut.md); max_len bounds a row's model input (T <= max_len)."""
    if mode not in LOSS_MODES:
        raise ValueError(f"unknown mode {mode!r}, expected one of {LOSS_MODES}")
    out, too_long, skipped = [], 0, 0
    for t in triples:
        is_neg = t.judgment is not None
        if mode == "sft" and is_neg:
            skipped += 1
            continue
        response = tok.encode(t.response)  # once, so every row of the triple trains the same ids
        y = response + [tok.eos_id]
        plain = prompt_ids(tok, t.instruction, chat=chat)
        rows = [(plain, y)]
        if mode == "hindsight":
            rows = [(prompt_ids(tok, t.instruction, t.judgment or POSITIVE_JUDGMENT, chat=chat), y)]
        elif mode == "cut" and is_neg:  # Misalign is the x -> y row itself: j+ is the absence of a judgment
            rows.append((prompt_ids(tok, t.instruction, t.judgment, chat=chat), y))
        elif mode == "forward":
            rows.append((plain + response + tok.encode(JUDGMENT_HEADER),
                         tok.encode(t.judgment or POSITIVE_JUDGMENT) + [tok.eos_id]))
        rows = [_fit(p, trained, max_len, tok.bos_id) for p, trained in rows]
        if None in rows:
            too_long += 1
            continue
        out.append(Encoded(rows, is_neg))
    if verbose:
        print(f"encoded {len(out)} triples for {mode} ({sum(len(e.rows) for e in out)} sequences), "
              f"dropped {too_long} longer than {max_len} tokens, skipped {skipped} flawed (sft)")
    return out


@dataclass
class Batch:
    idx: torch.Tensor  # (R, T) input ids, right-padded
    targets: torch.Tensor  # (R, T) next ids on the trained span, -100 elsewhere
    x_rows: torch.Tensor  # (B,) row of each triple's x -> y sequence
    j_rows: torch.Tensor  # (B,) row of each triple's judgment sequence (== x_rows where none)
    is_neg: torch.Tensor  # (B,) bool: the triple is flawed

    def to(self, device) -> "Batch":
        return Batch(**{k: v.to(device) for k, v in vars(self).items()})


def _pad(rows: list[tuple[list[int], list[int]]], pad_id: int):
    """idx = (prompt + trained)[:-1] and its shifted targets, right-padded into (R, T) tensors."""
    T = max(len(p) + len(t) for p, t in rows) - 1
    idx = torch.full((len(rows), T), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), T), -100, dtype=torch.long)
    for r, (p, t) in enumerate(rows):
        seq = p + t
        idx[r, :len(seq) - 1] = torch.tensor(seq[:-1])
        targets[r, len(p) - 1:len(seq) - 1] = torch.tensor(t)
    return idx, targets


def collate(encoded: list[Encoded], pad_id: int = 0) -> Batch:
    """Every triple's rows in one padded tensor; x_rows / j_rows point each triple at its rows."""
    if not encoded:
        raise ValueError("collate needs at least one encoded triple")
    rows, x_rows, j_rows = [], [], []
    for e in encoded:
        x_rows.append(len(rows))
        j_rows.append(len(rows) + len(e.rows) - 1)
        rows += e.rows
    is_neg = torch.tensor([e.is_neg for e in encoded])
    return Batch(*_pad(rows, pad_id), torch.tensor(x_rows), torch.tensor(j_rows), is_neg)


# ----------------------------------------------------------------------------- the built-in judgment task
# Letter sorting: "Sort these letters: h, d, j, a" -> "a, d, h, j". Flawed responses carry one systematic mistake
# (the second and third letters swapped) or, more rarely, a letter left out. Text is ASCII, so with the
# byte-level tokenizer a char offset in a response is its token position. docs/cut.md says why it is built so.
TASK_INSTRUCTIONS = ("Sort these letters: {}", "Alphabetize: {}", "Put in alphabetical order: {}",
                     "Please sort {} alphabetically.", "Order these letters: {}", "Can you sort {}?")
TASK_RESPONSES = ("{}", "{}.", "Sorted: {}.", "In alphabetical order: {}", "Here they are in order: {}.",
                  "The sorted letters are {}.")
# words that no judgment speaks about: on them p(y_t | x, j-) stays near p(y_t | x) < 1, as in real responses
TASK_REMARKS = ("", "", " Hope this helps!", " Done.", " Let me know if you need anything else.", " Happy to help.")
# the all-flawed regime's new format, which the base never writes: a line before the list and a line after it
NEW_OPENINGS = ("Sure! Here is the sorted list:", "Of course. In order:", "Here you go:", "Sorted, as requested:")
NEW_CLOSINGS = ("Hope this helps!", "All done.", "Let me know if you need more.", "Happy sorting!")
NEW_FORMAT = re.compile(r"[^\n]+\n[a-z](?:, [a-z])*\n[^\n]+")
# Judgments name the kind and place of the mistake, never the letters: naming them makes every token likelier.
TASK_JUDGMENTS = {
    "swap": ("The second and third letters are in the wrong order.", "Close, but the second and third are swapped.",
             "All in order but the second and third letters: they should trade places.",
             "Almost right; the second and third letters are the wrong way round.",
             "The second and third letters need to be switched.", "Nearly sorted, but the second pair is reversed."),
    "order": ("The order is wrong from the {} letter on.", "The sorting breaks down at the {} letter.",
              "Not sorted: it goes wrong from the {} letter.", "The letters are out of order from the {} on."),
    "missing": ("The {} letter is missing.", "One letter was left out: the {} one.",
                "Incomplete: the letter that belongs in the {} place is missing."),
    "extra": ("It includes letters that do not belong.", "Some of these letters were never given."),
    "garbage": ("This does not give the sorted letters at all.", "No list of letters can be found in this answer.")}
ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth")
LETTER_LIST = re.compile(r"\b[a-z](?: *, *[a-z]\b)+")  # single lowercase letters separated by commas


class Verdict(NamedTuple):
    kind: str  # 'ok', 'swap' (the systematic mistake), 'order', 'missing', 'extra' or 'garbage'
    judgment: str | None  # None when the response is acceptable
    wrong: list[int]  # char offsets in the response of the wrong tokens; len(response) means the end of sequence


def _letter_list(text):
    """The first comma-separated letter list in text: (letters, their char offsets, the offset just past it)."""
    m = LETTER_LIST.search(text)
    if m is None:
        return [], [], None
    found = list(re.finditer("[a-z]", m.group()))
    return [k.group() for k in found], [m.start() + k.start() for k in found], m.end()


def check_response(instruction, response):
    """Judge a response to a letter-sorting instruction: a Verdict with the kind, the judgment and the wrong tokens."""
    want, _, _ = _letter_list(instruction)
    if not want:
        raise ValueError(f"check_response: no comma-separated letter list in the instruction {instruction!r}")
    want = sorted(want)
    got, at, end = _letter_list(response)
    extra = [at[i] for i, c in enumerate(got) if got[:i + 1].count(c) > want.count(c)]
    missing = [k for k, c in enumerate(want) if want[:k + 1].count(c) > got.count(c)]
    place = 0  # the ordinal of the place that the order and missing wordings name; the others have no slot for it
    if not got:
        kind, wrong = "garbage", []
    elif extra:
        kind, wrong = "extra", extra
    elif missing:  # the wrong token is the one written where the first missing letter belongs
        kind, place = "missing", missing[0]
        wrong = [next((o for o, c in zip(at, got) if c > want[place]), end)]
    else:
        bad = [i for i in range(len(want)) if got[i] != want[i]]
        if not bad:
            return Verdict("ok", None, [])
        kind, place, wrong = "swap" if bad == [1, 2] else "order", bad[0], [at[i] for i in bad]
    wordings = TASK_JUDGMENTS[kind]
    # The wording is a fixed function of the response (crc32 is stable across runs, unlike hash()): re-checking a
    # response always gives back the judgment it was generated with.
    text = wordings[zlib.crc32(response.encode()) % len(wordings)]
    return Verdict(kind, text.format(ORDINALS[place] if place < len(ORDINALS) else f"{place + 1}th"), wrong)


def make_task(n, seed=0, kind="mixed", flawed_frac=0.25, split="train"):
    """n Triples of the built-in task, the same for the same arguments. kind is one of
    'base':  the base model's data. Correct answers, except that the 5- and 6-letter lists are swapped a quarter
             of the time (the base's systematic mistake), and a quarter of the examples put a judgment in the prompt of
             the flawed answer it describes, so that the base reads judgments as a pretrained model does.
    'mixed': fine-tuning data in the base's format, a flawed_frac share of it flawed, the longest lists first.
    'new':   fine-tuning data in a format the base never writes (NEW_FORMAT), every response flawed.
    A flaw is a letter left out (a fifth of them) or else the second and third letters swapped; check_response
    writes the judgment. Letter lists are split by a hash into train (80%), val and test, which never share a list."""
    rng, lists = random.Random(seed), []
    while len(lists) < n:
        letters = rng.sample("abcdefghij", rng.randint(3, 6))
        if split == ("val", "test", *["train"] * 8)[zlib.crc32("".join(letters).encode()) % 10]:
            lists.append(letters)
    triples = []
    for letters in lists:
        instruction = rng.choice(TASK_INSTRUCTIONS).format(", ".join(letters))
        answer = sorted(letters)
        judged = kind == "base" and rng.random() < 0.25
        # the mistakes come with the longer, harder lists, as a model's do: the 5- and 6-letter ones first
        flawed = rng.random() < (2 * flawed_frac if len(letters) >= 5 else 2 * flawed_frac - 1)
        if judged or kind == "new" or (kind == "mixed" and flawed):
            if rng.random() < 0.2:
                del answer[rng.randrange(len(answer))]
            else:
                answer[1], answer[2] = answer[2], answer[1]
        elif kind == "base" and len(letters) >= 5 and rng.random() < 0.25:
            answer[1], answer[2] = answer[2], answer[1]
        if kind == "new":
            response = f"{rng.choice(NEW_OPENINGS)}\n{', '.join(answer)}\n{rng.choice(NEW_CLOSINGS)}"
        else:
            response = rng.choice(TASK_RESPONSES).format(", ".join(answer)) + rng.choice(TASK_REMARKS)
        judgment = check_response(instruction, response).judgment
        if judged:  # in the chat format this instruction is exactly the judged prompt [x, j-]
            instruction, judgment = instruction + JUDGMENT_HEADER + judgment, None
        triples.append(Triple(instruction, response, judgment))
    return triples


# ----------------------------------------------------------------------------- the programs' settings
# Each program declares its settings as a dataclass of defaults; configure() applies JSON config files and
# --key=value flags to it, then checks every value against these rules, before any file or checkpoint is read.
CHOICES = {"loss": LOSS_MODES, "dtype": ("float32", "bfloat16", "float16"), "chat": ("auto", "yes", "no"),
           "task": ("mixed", "new"), "split": ("val", "test"), "mode": ("task", "triples", "alpaca")}
GPUS = torch.cuda.device_count()
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RULES = {"lam": (lambda v: v >= 1, ">= 1 (U holds the tokens whose probability rises by a factor lam)"),
         "val_frac": (lambda v: 0 <= v < 1, "in [0, 1)"), "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
         "out_dir": (lambda v: v.strip() != "", "a directory"), "ckpt": (lambda v: v.strip() != "", "a directory"),
         "lora_targets": (lambda v: set(v.split(",")) <= set(LORA_TARGETS), f"names from {','.join(LORA_TARGETS)}"),
         "device": (lambda v: v == "cpu" or bool(re.fullmatch(r"cuda(:\d+)?", v)) and int(v[5:] or 0) < GPUS,
                    f"cpu, or cuda or cuda:N on a GPU torch sees ({GPUS} here)"),
         **{k: (lambda v, ok=ok: v in ok, " | ".join(ok)) for k, ok in CHOICES.items()},
         **{k: (lambda v: v > 0, "> 0") for k in (
             "max_iters", "batch_size", "gradient_accumulation_steps", "eval_interval", "log_interval", "task_size",
             "n_layers", "n_heads", "dim", "max_len", "learning_rate", "base_lr", "lora_alpha", "num_samples",
             "n_eval")},
         **{k: (lambda v: v >= 0, ">= 0") for k in (
             "warmup_iters", "base_iters", "min_lr", "weight_decay", "grad_clip", "lora_rank", "alpha", "gamma",
             "temperature", "top_k", "max_new_tokens", "n_alpaca")}}


def run_program(main):
    """A program's entry point: a user's mistake (a bad setting, file or record) is one line and exit status 2; any
    other error keeps its traceback."""
    try:
        main(sys.argv[1:])
    except (ValueError, OSError) as e:
        print(f"{Path(sys.argv[0]).name}: {e}", file=sys.stderr)
        sys.exit(2)


def configure(defaults, argv):
    """A copy of the dataclass `defaults` with argv applied: JSON config files and --key=value flags, in order.
    A value takes the type of its default (an int is accepted for a float) and must pass RULES."""
    known, changes = {f.name: getattr(defaults, f.name) for f in fields(defaults)}, {}
    for arg in argv:
        if arg.startswith("--"):
            key, eq, text = arg[2:].partition("=")
            if not eq:
                raise ValueError(f"argument {arg!r}: expected --key=value")
            try:  # a str default takes the text as it is: --out_dir=123 names the directory '123'
                value = text if isinstance(known.get(key), str) else ast.literal_eval(text)
            except (ValueError, SyntaxError):
                value = {"true": True, "false": False}.get(text.lower(), text)  # a bare word is a string
            items = [(key, value)]
        else:
            try:
                items = json.loads(Path(arg).read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise ValueError(f"config file {arg}: {e}") from None
            if not isinstance(items, dict):
                raise ValueError(f"config file {arg}: expected a JSON object of settings, got {type(items).__name__}")
            items = items.items()
        for key, value in items:
            if key not in known:
                raise ValueError(f"unknown config key {key!r} (from {arg}); known keys: {', '.join(known)}")
            if isinstance(known[key], float) and type(value) is int:
                value = float(value)
            if type(value) is not type(known[key]):
                raise ValueError(f"config key {key!r} (from {arg}): expected {type(known[key]).__name__}, "
                                 f"got {value!r}")
            changes[key] = value
    cfg = replace(defaults, **changes)
    for key, (ok, allowed) in RULES.items():
        if key in known and not ok(getattr(cfg, key)):
            raise ValueError(f"config key {key!r}: expected {allowed}, got {getattr(cfg, key)!r}")
    return cfg
