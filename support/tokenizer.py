"""Tokenizer files on tiktoken: byte-level BPE (tokenizer.json), SentencePiece BPE with byte
fallback (tokenizer.model, or its tokenizer.json), Meta's Llama 3 tokenizer.model, a built-in byte
tokenizer, and the chat formats, which a tokenizer's special tokens reveal. data.py uses them.
"""
import base64
import json
import re
import struct
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import tiktoken

# chat format -> (special token that reveals it, end-of-turn token, a user turn then the assistant's
# header). Llama 2's [INST] is text (its chat template shows it); SentencePiece adds "▁" to text.
CHAT_FORMATS = {
    "llama3": ("<|start_header_id|>", "<|eot_id|>",
               "<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\n"),
    "chatml": ("<|im_start|>", "<|im_end|>",
               "<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"),
    "mistral": ("[INST]", "</s>", "[INST]{content}[/INST]"),
    "llama2": (None, "</s>", "[INST] {content} [/INST]"),  # no <<SYS>>: we have no system prompt
}
CHATML_TEMPLATE = ("{% for m in messages %}"
                   "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
                   "{% endfor %}"
                   "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
END_OF_TEXT = ("<|end_of_text|>", "<|endoftext|>", "<|eos|>", "<|eom_id|>", "</s>")
SUPPORTED = ("supported: a byte-level BPE tokenizer.json (optionally NFC), SentencePiece BPE with "
             "byte fallback (tokenizer.model, or its tokenizer.json of Llama 2 and Mistral) and "
             "Meta's Llama 3 tokenizer.model")
# a dummy prefix, spaces as "▁": SentencePiece's own
SP_NORMALIZER = {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "▁"},
                  {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIALS = [  # ids 128000.., Llama 3.1 names, 256 in all
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
    "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
    *(f"<|reserved_special_token_{i}|>" for i in range(3, 248))]
# the first UTF-8 lead byte of each length -> (bits after the lead byte, its least code point)
UTF8_LEADS = {0x00: (0, 0), 0xC0: (6, 0x80), 0xE0: (12, 0x800), 0xF0: (18, 0x10000)}


class Parts(NamedTuple):  # what Tokenizer._build needs from a tokenizer file
    ranks: dict  # token bytes -> tiktoken rank
    special: dict  # special token text -> id
    pattern: str  # tiktoken's split pattern
    bos_name: str | None
    nfc: bool = False
    sp: tuple | None = None  # SentencePiece: (the ids each rank stands for, the bytes of each id)


def _byte_chars():
    """GPT-2's byte -> printable character map, in which byte-level BPE vocabs are written: the
    bytes that print (!..~, ¡..¬, ®..ÿ) stand for themselves, the others for chr(256) on."""
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    rest = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + k) for k, b in enumerate(rest)}}


def _unencodable(ranks, where):
    """A pattern for the characters holding a byte the vocabulary lacks (tiktoken would panic on
    them). tokenizers drops such a byte; we drop the character: the same for ASCII, and otherwise
    only unassigned code points differ."""
    spans = []
    for b in [b for b in range(256) if bytes([b]) not in ranks]:
        if 0x80 <= b < 0xC0:
            raise ValueError(f"{where}: the vocabulary lacks the byte {b:#x}; {SUPPORTED}")
        if b < 0x80 or 0xC2 <= b <= 0xF4:  # C0, C1 and F5-FF never occur in UTF-8
            start = max(s for s in UTF8_LEADS if s <= b)
            shift, least = UTF8_LEADS[start]
            lo = max((b - start) << shift, least)
            hi = min(((b - start + 1) << shift) - 1, 0x10FFFF)
            spans.append(f"{re.escape(chr(lo))}-{re.escape(chr(hi))}")
    return re.compile(f"[{''.join(spans)}]") if spans else None


def _parse(file, data, parse):
    try:
        return parse(data)
    # bad JSON, base64 or protobuf, a malformed line, truncation
    except (ValueError, LookupError, struct.error) as e:
        raise ValueError(f"{file}: cannot read it ({e}); {SUPPORTED}") from None


def _meta_ranks(data):
    """Meta's tokenizer.model: one "base64(token bytes) rank" per line."""
    lines = map(bytes.split, data.splitlines())
    return {base64.b64decode(token, validate=True): int(rank) for token, rank in lines}


def _varint(buf, i):
    """The varint at buf[i] (7 bits a byte, the lowest first) and the index after it."""
    start = i
    while buf[i] & 0x80:
        i += 1
    return sum((b & 0x7F) << (7 * k) for k, b in enumerate(buf[start:i + 1])), i + 1


def _proto(buf):
    """{field: [values]} of a protobuf: varints as ints, 32-bit as floats, the others as bytes."""
    fields = {}
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        kind = key & 7  # wire type: 0 a varint, 2 a length and as many bytes, 1 8 bytes, 5 4 bytes
        if kind == 0:
            value, i = _varint(buf, i)
        else:
            if kind == 2:
                size, i = _varint(buf, i)
            else:
                size = {1: 8, 5: 4}[kind]  # KeyError for the other wire types: an unreadable file
            value = buf[i:i + size]
            i += size
        if kind == 5:
            value = struct.unpack("<f", value)[0]
        fields.setdefault(key >> 3, []).append(value)
    if i > len(buf):
        raise ValueError("truncated")
    return fields


def _sp_model(data):
    """{id: (text, score, type)}, trainer spec and normalizer spec of a SentencePiece model."""
    model = _proto(data)
    pieces = {i: (p.get(1, [b""])[0].decode(), *p.get(2, [0.0]), *p.get(3, [1]))
              for i, p in enumerate(map(_proto, model.get(1, [])))}
    return pieces, _proto(model.get(2, [b""])[0]), _proto(model.get(3, [b""])[0])


def _check_sp_model(path, pieces, trainer, norm):
    """Refuse a SentencePiece model that _sp_parts would misread (sentencepiece_model.proto)."""
    checks = {  # field: (value read, value required); a repeated field never matches a list
        "trainer_spec.model_type": (trainer.get(3, [1]), [2]),  # BPE
        "trainer_spec.byte_fallback": (trainer.get(35, [0]), [1]),
        "trainer_spec.treat_whitespace_as_suffix": (trainer.get(24, [0]), [0]),
        "normalizer_spec.precompiled_charsmap": (norm.get(2, [b""]), [b""]),
        "normalizer_spec.add_dummy_prefix": (norm.get(3, [1])[0], 1),
        "normalizer_spec.remove_extra_whitespaces": (norm.get(4, [1])[0], 0),
        "normalizer_spec.escape_whitespaces": (norm.get(5, [1])[0], 1),
        # piece types 4 user-defined, 5 unused
        "pieces.type": (any(kind in (4, 5) for _, _, kind in pieces.values()), False),
    }
    wrong = [name for name, (read, required) in checks.items() if read != required]
    if wrong:
        raise ValueError(f"{path}: a SentencePiece model, but not BPE with byte fallback, no "
                         f"normalization, a dummy prefix, whitespace kept and no user-defined "
                         f"pieces ({', '.join(wrong)}); {SUPPORTED}")


def _sp_parts(pieces, bos_name, where):
    """The Parts of SentencePiece BPE: pieces {id: (text, score, type)}, type 1 normal, 2 unknown,
    3 control, 6 byte. SentencePiece merges the pair whose piece scores highest, tiktoken the pair
    whose bytes rank lowest: rank the characters' UTF-8 prefixes first, then the longer pieces by
    falling score, ties by id. Byte fallback: a rank that is no piece stands for its byte tokens."""
    ids = {p.encode(): i for i, (p, _, kind) in pieces.items() if kind == 1}
    byte_ids = {int(p[3:5], 16): i for i, (p, _, kind) in pieces.items() if kind == 6}
    if sorted(byte_ids) != list(range(256)):
        raise ValueError(f"{where}: SentencePiece without the 256 byte fallback tokens "
                         f"<0x00>..<0xFF>; {SUPPORTED}")
    prefixes = {c.encode()[:k] for p in ids for c in p.decode() for k in range(2, 5)}
    longer = [p for p in ids if len(p.decode()) > 1]
    longer.sort(key=lambda p: (-pieces[ids[p]][1], ids[p]))
    order = sorted({bytes([b]) for b in range(256)} | prefixes) + longer
    table = [[ids[b]] if b in ids else [byte_ids[x] for x in b] for b in order]
    text = {i: b"" for i in pieces}  # the bytes of each id: none for unknown and control pieces
    text.update({i: p.replace("▁", " ").encode() for i, (p, _, k) in pieces.items() if k == 1})
    text.update({i: bytes([int(p[3:5], 16)]) for i, (p, _, k) in pieces.items() if k == 6})
    ranks = {b: r for r, b in enumerate(order)}
    special = {p: i for i, (p, _, kind) in pieces.items() if kind in (2, 3)}
    # no pre-tokenizer: the whole text is one piece
    return Parts(ranks, special, r"[\s\S]+", bos_name, False, (table, text))


def _hf_parts(spec, where):
    """The Parts of a byte-level or a SentencePiece BPE tokenizer.json, else ValueError."""
    model = spec.get("model") or {}
    pre = spec.get("pre_tokenizer") or {}
    post = spec.get("post_processor") or {}  # BOS: a TemplateProcessing with a special token first
    processors = post.get("processors", [post])
    firsts = [p["single"][0] for p in processors if p.get("type") == "TemplateProcessing"]
    bos = (firsts[0].get("SpecialToken") or {}).get("id") if firsts else None
    specials = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
    # a merge is "a b" or ["a", "b"]
    merges = ["".join(m.split(" ") if isinstance(m, str) else m) for m in model.get("merges", [])]
    if model.get("byte_fallback"):  # SentencePiece BPE, Hugging Face's form (Llama 2, Mistral v0.1)
        # a pre-tokenizer (as Metaspace) is refused too: " a" != "▁▁a"
        if model.get("type") != "BPE" or spec.get("normalizer") != SP_NORMALIZER or pre:
            raise ValueError(f"{where}: byte fallback, but not SentencePiece's normalizer alone "
                             f"(Prepend and Replace with '▁'); remove it to read the "
                             f"tokenizer.model beside it; {SUPPORTED}")
        score = {m: -k for k, m in reversed(list(enumerate(merges)))}  # a piece's first merge
        pieces = {i: (p, score.get(p, -len(merges)), 6 if re.fullmatch("<0x[0-9A-F]{2}>", p) else 1)
                  for p, i in model["vocab"].items()}
        pieces.update({i: (p, 0.0, 3) for p, i in specials.items()})
        return _sp_parts(pieces, bos, where)
    steps = (pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]) or [{}]
    split = steps[0] if len(steps) == 2 and steps[0].get("type") == "Split" else {}
    byte_level = steps[-1] if steps[-1].get("type") == "ByteLevel" else {}
    pattern = split.get("pattern", {}).get("Regex") if split else GPT2_SPLIT
    if not (model.get("type") == "BPE"
            and not model.get("continuing_subword_prefix")
            and not model.get("end_of_word_suffix")
            and spec.get("normalizer") in (None, {"type": "NFC"})
            and byte_level
            and len(steps) == 1 + bool(split)  # ByteLevel alone or after the Split
            and not byte_level.get("add_prefix_space")
            and byte_level.get("use_regex", True) != bool(split)  # one split, not two
            and (not split or (split.get("behavior") == "Isolated" and not split.get("invert")))
            and pattern):
        raise ValueError(f"{where}: not a byte-level BPE tokenizer ({model.get('type')}, "
                         f"pre-tokenizer {pre.get('type')}); {SUPPORTED}")
    byte_of = {c: b for b, c in _byte_chars().items()}
    try:
        vocab = model["vocab"].items()
        ranks = {bytes(byte_of[c] for c in t): i for t, i in vocab if t not in specials}
        merged = [ranks[bytes(byte_of[c] for c in m)] for m in merges]
    except KeyError as e:
        raise ValueError(f"{where}: vocab or merges hold {e} that is not a byte-level token; "
                         f"{SUPPORTED}") from None
    # tiktoken merges by the merged token's rank: the merges order only if that follows the ids
    if any(b < a for a, b in zip(merged, merged[1:])):
        raise ValueError(f"{where}: the merges do not follow the vocab ids; {SUPPORTED}")
    return Parts(ranks, specials, pattern, bos, spec.get("normalizer") is not None)


@dataclass
class Tokenizer:
    """tiktoken BPE + special tokens, which encode() never parses: user text cannot inject a control
    token. eos_id: the chat format's end-of-turn token if in the vocabulary, else end-of-text."""
    enc: tiktoken.Encoding
    n_vocab: int
    special: dict  # special token text -> id
    bos_id: int | None  # prepended to every sequence (None: the tokenizer adds none, as SmolLM2)
    eos_id: int
    stop_ids: list
    chat: str | None
    instruct: bool  # the chat format is its own: train.py's cut_chat, else it ships a chat template
    files: dict  # file name -> bytes, written by save()
    drop: re.Pattern | None  # characters the vocabulary cannot encode
    nfc: bool  # text is NFC-normalized first (Qwen)
    sp: tuple | None  # SentencePiece: (the ids each tiktoken rank stands for, the bytes of each id)

    @classmethod
    def _build(cls, name, eos_name, template, files, parts, instruct):
        special = parts.special
        chat = next((c for c, (mark, _, _) in CHAT_FORMATS.items() if mark in special), None)
        # Llama 2's [INST] is text: its chat template shows it, as does Meta's layout (no template)
        if chat is None and ("[INST]" in template or (parts.sp and not template)):
            chat = "llama2"
        end_of_turn = CHAT_FORMATS[chat][1] if chat else None
        ends = [n for n in (end_of_turn, eos_name, *END_OF_TEXT) if n in special]
        if not ends or (parts.bos_name is not None and parts.bos_name not in special):
            raise ValueError(
                f"{name}: no end-of-text token or an unknown BOS token {parts.bos_name!r}")
        # SentencePiece's ranks are not its ids: its special tokens stay out of tiktoken
        enc = tiktoken.Encoding(name, pat_str=parts.pattern, mergeable_ranks=parts.ranks,
                                special_tokens={} if parts.sp else special)
        n_vocab = max(parts.sp[1]) + 1 if parts.sp else enc.n_vocab
        return cls(enc, n_vocab, special, special.get(parts.bos_name), special[ends[0]],
                   sorted({special[n] for n in ends}), chat, instruct, files,
                   _unencodable(parts.ranks, name), parts.nfc, parts.sp)

    @classmethod
    def from_pretrained(cls, path):
        path = Path(path)
        if path.is_dir():
            # tokenizer.model first: its tokenizer.json may be the Metaspace form that we refuse
            names = ("tokenizer.model", "tokenizer.json", "original/tokenizer.model")
            found = [path / n for n in names if (path / n).is_file()]
            if not found:
                raise FileNotFoundError(f"{path}: no tokenizer.model, tokenizer.json or "
                                        f"original/tokenizer.model; {SUPPORTED}")
            path = found[0]
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such tokenizer file; {SUPPORTED}")
        data = path.read_bytes()
        beside = [path.with_name(n) for n in ("tokenizer_config.json", "chat_template.jinja")]
        extra = {p.name: p.read_bytes() for p in beside if p.is_file()}
        config = _parse(beside[0], extra.get("tokenizer_config.json", b"{}"), json.loads)
        eos = config.get("eos_token")
        eos = eos.get("content") if isinstance(eos, dict) else eos
        jinja = extra.get("chat_template.jinja", b"")
        template = str(config.get("chat_template") or jinja.decode())
        name = "tokenizer.json" if path.suffix == ".json" else "tokenizer.model"
        if name == "tokenizer.json" and "tokenizer_config.json" not in extra:  # a partial copy?
            print(f"warning: {path}: no tokenizer_config.json beside it: no chat template (the "
                  "Alpaca template) and an EOS guessed from the special tokens")
        if name == "tokenizer.json":
            parts = _hf_parts(_parse(path, data, json.loads), path)
        elif data[:1] == b"\n":  # a protobuf's field 1: SentencePiece's pieces (Llama 3's: base64)
            pieces, trainer, norm = _parse(path, data, _sp_model)
            _check_sp_model(path, pieces, trainer, norm)
            bos = pieces.get(trainer.get(41, [1])[0], [None])[0]  # trainer_spec.bos_id
            parts = _sp_parts(pieces, bos, path)
        else:
            ranks = _parse(path, data, _meta_ranks)
            special = {t: len(ranks) + i for i, t in enumerate(LLAMA3_SPECIALS)}
            parts = Parts(ranks, special, LLAMA3_SPLIT, "<|begin_of_text|>")
        instruct = config.get("cut_chat", bool(template))  # train.py records its prompt format
        return cls._build(str(path), eos, template, {name: data, **extra}, parts, instruct)

    @classmethod
    def byte_level(cls):
        """Ids 0..255 the bytes, then <|bos|>, <|eos|>, <|im_start|>, <|im_end|>: a byte-level BPE
        with no merges, and ChatML, whose short prompts keep the built-in task cheap on a CPU."""
        names = ("<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>")
        byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                      "use_regex": True}
        added = [{"id": 256 + i, "content": t, "single_word": False, "lstrip": False,
                  "rstrip": False, "normalized": False, "special": True}
                 for i, t in enumerate(names)]
        bos_first = {"type": "TemplateProcessing", "pair": [], "single": [
            {"SpecialToken": {"id": names[0], "type_id": 0}},
            {"Sequence": {"id": "A", "type_id": 0}}],
            "special_tokens": {names[0]: {"id": names[0], "ids": [256], "tokens": [names[0]]}}}
        vocab = {c: b for b, c in _byte_chars().items()}
        spec = {"added_tokens": added, "pre_tokenizer": byte_level, "decoder": byte_level,
                "post_processor": bos_first, "model": {"type": "BPE", "vocab": vocab, "merges": []}}
        config = {"bos_token": names[0], "eos_token": names[3], "chat_template": CHATML_TEMPLATE}
        files = {"tokenizer.json": json.dumps(spec, ensure_ascii=False).encode(),
                 "tokenizer_config.json": json.dumps(config).encode()}
        parts = _hf_parts(spec, "byte_level")
        return cls._build("byte_level", names[3], CHATML_TEMPLATE, files, parts, True)

    def encode(self, text):
        if self.nfc:
            text = unicodedata.normalize("NFC", text)
        if self.sp:  # SentencePiece: a dummy prefix, spaces as "▁", then the ids of each rank
            ranks = self.enc.encode_ordinary(("▁" + text.replace(" ", "▁")) if text else "")
            return [i for r in ranks for i in self.sp[0][r]]
        if self.drop:
            text = self.drop.sub("", text)
        return self.enc.encode_ordinary(text)

    def decode(self, ids):
        if self.sp:  # the bytes of each id, less SentencePiece's dummy prefix
            return b"".join(self.sp[1][i] for i in ids).decode(errors="replace").removeprefix(" ")
        return self.enc.decode(list(ids))

    def save(self, directory):
        Path(directory).mkdir(parents=True, exist_ok=True)
        for name, data in self.files.items():
            Path(directory, name).write_bytes(data)
