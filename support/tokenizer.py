"""Tokenizer files on tiktoken: byte-level BPE (tokenizer.json), SentencePiece BPE with byte fallback
(tokenizer.model, or its tokenizer.json), Meta's Llama 3 tokenizer.model, and a built-in byte tokenizer.

data.py writes prompts with these tokenizers; model.py never sees text. The chat formats live here because a
tokenizer's special tokens reveal which one a checkpoint speaks.
"""
import base64
import json
import re
import struct
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import tiktoken

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
