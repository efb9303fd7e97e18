"""data.py against independent references: tokenizers / transformers, known token ids, hand-written strings."""
import dataclasses
import json
import random
import re
import shutil
import unicodedata

import pytest
import torch

from data import (JUDGED, JUDGMENT_HEADER, PLAIN, POSITIVE_JUDGMENT, collate, encode_triples, prompt_ids,
                  split_triples)
from support.settings import configure
from support.tokenizer import Tokenizer
from support.triple_files import Triple, load_triples
from tasks.letters import NEW_FORMAT, TASK_JUDGMENTS, TASK_REMARKS, TASK_RESPONSES, check_response, make_task

# ----------------------------------------------------------------------------- tokenizers
CORPUS = [
    "Hello world", "This is a test sentence.", "",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)  # slow\n\n\n",
    "for (int i = 0; i < n; ++i) { a[i] = b[i] * 2.5f; }\t// tabs\t\tand more",
    "我们今天去公园散步，天气很好。", "مرحبا بالعالم، كيف حالك؟", "Привет, мир! Как дела?", "नमस्ते दुनिया, आप कैसे हैं?",
    "こんにちは世界", "Ελληνικά κείμενα", "😀👍🏽 family: 👨‍👩‍👧 flags 🇫🇷🇯🇵",
    "1234567890 3.14159 1,000,000 2024-01-31 12:30:45 0x1F 1e-9",
    "a   b\t\tc\n\n\n  d \n \n", "   leading spaces", "trailing spaces   ", "\r\n\r\nwindows\r\nlines",
    "I'm you're they've he'd we'll it's DON'T I'LL She'S", "naïve café résumé Ångström ß ﬁ",
    "<html><body class=\"x\">&amp; &lt;tag&gt;</body></html>", "$ ls -la | grep '^d' && echo \"done\" >> log.txt",
]
random.seed(0)
CORPUS.append("".join(random.choice(CORPUS) + random.choice([" ", "\n", "", "  ", "\n\n"]) for _ in range(300)))


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    return Tokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def llama3(llama3_tokenizer_file):
    return Tokenizer.from_pretrained(llama3_tokenizer_file)


@pytest.fixture(scope="module")
def smollm2_ref(smollm2_dir):
    tokenizers = pytest.importorskip("tokenizers")
    return tokenizers.Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))


def test_smollm2_matches_tokenizers(smollm2, smollm2_ref):
    assert len(CORPUS[-1]) > 3000
    for text in CORPUS:
        ids = smollm2.encode(text)
        assert ids == smollm2_ref.encode(text, add_special_tokens=False).ids, text[:80]
        assert smollm2.decode(ids) == text
    assert (smollm2.n_vocab, smollm2.bos_id, smollm2.eos_id, smollm2.stop_ids) == (49152, None, 2, [0, 2])
    assert smollm2.chat == "chatml" and smollm2.instruct  # chat_template.jinja beside tokenizer.json


def test_bytes_missing_from_vocab_are_dropped(smollm2, smollm2_ref):
    # SmolLM2's vocabulary lacks the byte 0x04: tiktoken would panic; tokenizers drops it
    ids = smollm2.encode("a\x04b")
    assert smollm2.decode(ids) == smollm2_ref.decode(smollm2_ref.encode("a\x04b", add_special_tokens=False).ids) == "ab"


def test_llama3_tokenizer_model_known_ids(llama3):
    assert llama3.encode("Hello world") == [9906, 1917]
    assert llama3.encode("This is a test sentence.") == [2028, 374, 264, 1296, 11914, 13]
    expected = {"<|begin_of_text|>": 128000, "<|end_of_text|>": 128001, "<|reserved_special_token_0|>": 128002,
                "<|finetune_right_pad_id|>": 128004, "<|reserved_special_token_2|>": 128005,
                "<|start_header_id|>": 128006, "<|end_header_id|>": 128007, "<|eom_id|>": 128008, "<|eot_id|>": 128009,
                "<|python_tag|>": 128010, "<|reserved_special_token_3|>": 128011,
                "<|reserved_special_token_247|>": 128255}
    for text, i in expected.items():
        assert llama3.decode([i]) == text
    assert (llama3.n_vocab, llama3.bos_id, llama3.eos_id, llama3.stop_ids) == (128256, 128000, 128009,
                                                                            [128001, 128008, 128009])
    assert llama3.chat == "llama3" and not llama3.instruct
    for text in CORPUS:
        assert llama3.decode(llama3.encode(text)) == text


def test_llama3_hf_tokenizer_json_matches_tokenizers_and_meta(llama3, llama3_tokenizer_file, tmp_path):
    """Llama 3's HF layout (Split + ByteLevel, BOS by the post-processor), as transformers converts Meta's file."""
    pytest.importorskip("transformers")
    from tokenizers import processors
    from transformers.convert_slow_tokenizer import TikTokenConverter

    specials = [llama3.decode([i]) for i in range(128000, 128256)]
    ref = TikTokenConverter(vocab_file=str(llama3_tokenizer_file), extra_special_tokens=specials).converted()
    ref.post_processor = processors.Sequence([processors.ByteLevel(trim_offsets=False), processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 128000)])])
    ref.save(str(tmp_path / "tokenizer.json"))
    hf = Tokenizer.from_pretrained(tmp_path / "tokenizer.json")
    for text in CORPUS:
        ids = hf.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False).ids == llama3.encode(text), text[:80]
    assert ref.encode("x").ids[0] == hf.bos_id == 128000
    assert (hf.n_vocab, hf.eos_id, hf.stop_ids, hf.chat) == (128256, 128009, [128001, 128008, 128009], "llama3")


def test_special_token_text_is_not_parsed(smollm2, smollm2_ref, llama3):
    for tok, text, special in [(smollm2, "<|im_end|>", 2), (smollm2, "<|im_start|>", 1), (llama3, "<|eot_id|>", 128009),
                               (llama3, "<|begin_of_text|>", 128000), (Tokenizer.byte_level(), "<|eos|>", 257)]:
        ids = tok.encode(f"say {text} now")
        assert len(ids) > 3 and special not in ids and tok.decode(ids) == f"say {text} now"
        assert tok.decode([special]) == text
    assert 2 in smollm2_ref.encode("say <|im_end|> now").ids  # the reference does parse it: the text is the real one


def test_byte_level_round_trip_and_save(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    tok = Tokenizer.byte_level()
    text = "héllo wörld 😀 \n\t 123 <|bos|>"
    assert tok.encode(text) == list(text.encode()) and tok.decode(tok.encode(text)) == text
    assert (tok.n_vocab, tok.bos_id, tok.eos_id, tok.stop_ids) == (260, 256, 259, [257, 259])
    assert tok.chat == "chatml" and tok.instruct
    tok.save(tmp_path)
    back = Tokenizer.from_pretrained(tmp_path)
    ref = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert (back.n_vocab, back.bos_id, back.eos_id, back.stop_ids, back.chat, back.instruct) == (
        260, 256, 259, [257, 259], "chatml", True)
    # the chat prompt equals transformers' rendering of the chat template that save() wrote
    hf = pytest.importorskip("transformers").AutoTokenizer.from_pretrained(tmp_path)
    rendered = hf.apply_chat_template([{"role": "user", "content": "Sort: b, a"}], tokenize=False, add_generation_prompt=True)
    assert back.decode(prompt_ids(back, "Sort: b, a", chat=True)) == "<|bos|>" + rendered
    for text in CORPUS[:-1]:
        assert back.encode(text) == ref.encode(text, add_special_tokens=False).ids == list(text.encode())
    assert ref.encode("a").ids == [256, 97] and ref.decode([104, 105]) == "hi"


def test_save_round_trip(smollm2, llama3, tmp_path):
    for name, tok in [("smollm2", smollm2), ("llama3", llama3)]:
        tok.save(tmp_path / name)
        back = Tokenizer.from_pretrained(tmp_path / name)
        assert (back.n_vocab, back.bos_id, back.eos_id, back.stop_ids, back.chat, back.instruct) == (
            tok.n_vocab, tok.bos_id, tok.eos_id, tok.stop_ids, tok.chat, tok.instruct)
        assert back.encode(CORPUS[-1]) == tok.encode(CORPUS[-1])


def test_prompt_templates(smollm2, llama3):
    plain = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
             "request.\n\n### Instruction:\nName a {color}.\n\n### Response:\n")
    judged = ("Below is an instruction that describes a task. Write a response to the instruction and the response "
              "should match the corresponding judgment.\n\n### Instruction:\nName a {color}.\n\n### Judgment:\n"
              "Too vague.\n\n### Response:\n")
    assert PLAIN.format(instruction="Name a {color}.") == plain
    assert JUDGED.format(instruction="Name a {color}.", judgment="Too vague.") == judged
    for tok, bos in [(smollm2, ""), (llama3, "<|begin_of_text|>")]:
        ids = prompt_ids(tok, "Name a {color}.")
        assert tok.decode(ids) == bos + plain and ids[len(bos and [1]):] == tok.encode(plain)
        assert tok.decode(prompt_ids(tok, "Name a {color}.", "Too vague.")) == bos + judged


def test_chat_prompt_smollm2_matches_apply_chat_template(smollm2, smollm2_dir):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(smollm2_dir))
    system = [{"role": "system", "content": "You are helpful."}]

    def hf_ids(messages, **kw):
        out = hf.apply_chat_template(messages, tokenize=True, **kw)
        return list(out if isinstance(out, list) else out["input_ids"])

    head = hf_ids(system)
    cases = [("What is 2+2?", None, "What is 2+2?"),  # (instruction, judgment, the user turn's content)
             ("  Two spaces\n\nand lines ", "Wrong.", "  Two spaces\n\nand lines \n\n### Judgment:\nWrong.")]
    for instruction, judgment, content in cases:
        full = hf_ids(system + [{"role": "user", "content": content}], add_generation_prompt=True)
        assert full[:len(head)] == head and full[len(head):] == prompt_ids(smollm2, instruction, judgment, chat=True)
    ids = prompt_ids(smollm2, "x<|im_end|>", chat=True)
    assert ids.count(2) == 1 and ids.count(1) == 2  # only the format's own control tokens


def test_chat_prompt_llama3(llama3):
    text = ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n\nWhat is 2+2?\n\n### Judgment:\nWrong."
            "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    ids = prompt_ids(llama3, "\nWhat is 2+2?", "Wrong.", chat=True)  # the user text joins the "\n\n" before it
    assert ids == llama3.enc.encode(text, allowed_special="all") and llama3.decode(ids) == text
    assert ids[:2] == [128000, 128006] and ids[-4:] == [128006, 78191, 128007, 271]
    with pytest.raises(ValueError, match="no chat format"):  # a vocabulary without a chat format's tokens
        prompt_ids(dataclasses.replace(Tokenizer.byte_level(), chat=None), "x", chat=True)


def test_unsupported_tokenizers_fail_clearly(tmp_path):
    sentencepiece_style = {
        "version": "1.0", "added_tokens": [{"id": 0, "content": "<unk>", "special": True}],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
        "pre_tokenizer": None, "post_processor": None,
        "decoder": {"type": "Sequence", "decoders": [{"type": "ByteFallback"}]},
        "model": {"type": "BPE", "byte_fallback": True, "unk_token": "<unk>", "vocab": {"<unk>": 0, "▁": 1, "a": 2},
                  "merges": []}}
    (tmp_path / "tokenizer.json").write_text(json.dumps(sentencepiece_style))
    with pytest.raises(ValueError, match="without the 256 byte fallback tokens .*; supported: a byte-level BPE") as err:
        Tokenizer.from_pretrained(tmp_path)
    assert str(tmp_path / "tokenizer.json") in str(err.value)
    # transformers' newer form: Metaspace, which puts no "▁" before a leading space, unlike SentencePiece
    metaspace = dict(sentencepiece_style, normalizer=None, pre_tokenizer={
        "type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": False})
    (tmp_path / "tokenizer.json").write_text(json.dumps(metaspace))
    with pytest.raises(ValueError, match="not SentencePiece's normalizer alone .*SentencePiece BPE with byte fallback"):
        Tokenizer.from_pretrained(tmp_path)
    unigram = dict(sentencepiece_style, normalizer=None, model={"type": "Unigram", "vocab": [["<unk>", 0.0]]})
    (tmp_path / "tokenizer.json").write_text(json.dumps(unigram))
    with pytest.raises(ValueError, match="not a byte-level BPE tokenizer .*; supported: a byte-level BPE"):
        Tokenizer.from_pretrained(tmp_path / "tokenizer.json")
    (tmp_path / "sp" / "tokenizer.model").parent.mkdir()
    pieces = b"\n\x0e\n\x05<unk>\x15\x00\x00\x00\x00\x18\x02\n\x05\n\x03\xe2\x96\x81"  # protobuf: <unk>, "▁"
    unigram = b"\x12\x02\x18\x01"  # trainer_spec {model_type: UNIGRAM}
    for data, error in [(pieces, "not BPE with byte fallback"), (pieces + unigram, "not BPE with byte fallback"),
                        (pieces[:12], r"cannot read it \(truncated\)")]:
        (tmp_path / "sp" / "tokenizer.model").write_bytes(data)
        with pytest.raises(ValueError, match=f"tokenizer.model: .*{error}.*; supported: .*Meta's Llama 3"):
            Tokenizer.from_pretrained(tmp_path / "sp")
    Tokenizer.byte_level().save(tmp_path / "bl")
    spec = json.loads((tmp_path / "bl" / "tokenizer.json").read_text())
    spec["model"]["vocab"].update({"ab": 258, "bc": 259})
    spec["model"]["merges"] = [["b", "c"], ["a", "b"]]  # BPE by merges order != BPE by ids: refuse, never differ
    (tmp_path / "bl" / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="merges do not follow the vocab ids"):
        Tokenizer.from_pretrained(tmp_path / "bl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty: no tokenizer.model, tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path / "empty")


def test_a_directory_reads_sentencepieces_own_file_first(family_dir, tmp_path):
    """Mistral v0.3's download: a Metaspace tokenizer.json, which we refuse, beside its tokenizer.model."""
    spm = pytest.importorskip("sentencepiece")
    shutil.copy(family_dir / "mistral-7b-v0.3.tokenizer.model", tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "byte_fallback": True},
                                                         "pre_tokenizer": {"type": "Metaspace"}}))
    ref = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    assert Tokenizer.from_pretrained(tmp_path).encode(" Hello  world") == ref.encode(" Hello  world")


# ----------------------------------------------------------------------------- Llama 2, Mistral, Qwen
# What a tokenizer finds hard: spaces and whitespace runs, digits, scripts, emoji and rare characters (byte fallback),
# code, and text that looks like special tokens or SentencePiece's own notation
ATOMS = [*CORPUS[:-1], " ", "  ", "   ", "\n", "\n\n", "\t", " \t", "\r\n", "\n ", "7", "42", "3.14", "1,000,000", "²½",
         "中文", "漢字とかな", "한국어", "ไทย", "😀", "👨‍👩‍👧", "🇫🇷", "🧪", "𝔘𝔫𝔦", "𠀀𠀁", "e\u0301", "\u200b", "\ufeff", "\x00",
         "\x7f", "\u2028", "ﬁ", "▁", "▁▁x", "<s>", "</s>", "<unk>", "[INST]", "[/INST]", "<<SYS>>", "<|im_start|>",
         "<|endoftext|>", "<0x0A>", "def f(x):\n    return x  # ok", "if (a && b) { c++; }", "https://x.org/?q=1&r=2"]
LLAMA2_TEMPLATE = (  # Llama-2-chat's, as published with its Hugging Face checkpoints
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
    "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + "
    "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")
MISTRAL_V1_TEMPLATE = (  # Mistral-7B-Instruct-v0.1's
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")
MISTRAL_V3_TEMPLATE = (  # Mistral-7B-Instruct-v0.3's, for user and assistant turns
    "{{- bos_token }}{%- for message in messages %}{%- if message['role'] == 'user' %}"
    "{{- '[INST] ' + message['content'] + '[/INST]' }}{%- elif message['role'] == 'assistant' %}"
    "{{- ' ' + message['content'] + eos_token }}{%- endif %}{%- endfor %}")


def varied_corpus(n=1200):
    """n strings ("", the atoms, runs of 1 to 8 atoms or random code points: rare ones need byte fallback), then the
    whitespace runs of every length to 39, where SentencePiece's many whitespace pieces tie on score."""
    rng = random.Random(0)
    spans = [(0x20, 0x3000), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0x1F300, 0x1FAFF), (0x20000, 0x2FFFF)]
    atoms = ATOMS + [chr(rng.randrange(*rng.choice(spans))) for _ in range(300)]
    runs = [a + space * k + b for k in range(1, 40) for space in (" ", "\t", "\n", " \n") for a, b in [("", ""), "xy"]]
    return (["", *ATOMS] + ["".join(rng.choice(atoms) for _ in range(rng.randint(1, 8))) for _ in range(n - len(ATOMS))]
            + runs)


@pytest.mark.parametrize("name", ["llama-2", "mistral-7b-v0.1", "mistral-7b-v0.3"])
def test_sentencepiece_model_matches_sentencepiece(family_dir, name):
    spm = pytest.importorskip("sentencepiece")
    file = family_dir / f"{name}.tokenizer.model"
    ref, tok = spm.SentencePieceProcessor(model_file=str(file)), Tokenizer.from_pretrained(file)
    corpus = varied_corpus() + [CORPUS[-1], "\n".join(varied_corpus())]
    round_trips = 0
    for text in corpus:
        ids = tok.encode(text)
        assert ids == ref.encode(text), text[:80]
        assert tok.decode(ids) == ref.decode(ids), text[:80]  # so decode(encode(s)) == s wherever sentencepiece's does
        assert not set(ids) & set(tok.special.values())
        round_trips += tok.decode(ids) == text
    assert len(corpus) > 1000 and round_trips > 0.9 * len(corpus)
    assert tok.decode(ref.encode(" x  y ")) == ref.decode(ref.encode(" x  y ")) == " x  y "  # the dummy prefix only
    n = ref.get_piece_size()
    assert (tok.n_vocab, tok.bos_id, tok.eos_id, tok.stop_ids) == (n, ref.bos_id(), ref.eos_id(), [ref.eos_id()])
    assert set(tok.special.values()) == {i for i in range(n) if ref.is_control(i) or ref.is_unknown(i)}
    # no chat template: plain prompts unless chat is forced, then the family's own format
    assert not tok.instruct and tok.chat == ("mistral" if name == "mistral-7b-v0.3" else "llama2")


@pytest.mark.parametrize("name", ["mistral-7b-v0.1", "qwen3"])
def test_tokenizer_json_matches_tokenizers(family_dir, name):
    tokenizers = pytest.importorskip("tokenizers")
    file = family_dir / f"{name}.tokenizer.json"
    ref, tok = tokenizers.Tokenizer.from_file(str(file)), Tokenizer.from_pretrained(file)
    # tokenizers parses special tokens in the text, we never do (checked below): compare the others
    corpus = varied_corpus() + [CORPUS[-1], "\n".join(varied_corpus())]
    corpus = [t for t in corpus if not any(s in t for s in tok.special)]
    round_trips = 0
    for text in corpus:
        ids = tok.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False).ids, text[:80]
        assert tok.decode(ids) == ref.decode(ids), text[:80]
        round_trips += tok.decode(ids) == (unicodedata.normalize("NFC", text) if tok.nfc else text)
    assert tok.nfc == (name == "qwen3") and len(corpus) > 1000
    assert round_trips == len(corpus) if tok.nfc else round_trips > 0.9 * len(corpus)  # SentencePiece: not "▁"
    assert not set(tok.encode("".join(tok.special))) & set(tok.special.values())
    if name == "qwen3":  # no BOS; the same ranks as Qwen's own tiktoken file
        tiktoken_load = pytest.importorskip("tiktoken.load")
        assert tok.enc._mergeable_ranks == tiktoken_load.load_tiktoken_bpe(str(family_dir / "qwen.tiktoken"))
        assert (tok.n_vocab, tok.bos_id, tok.eos_id, tok.stop_ids) == (151669, None, 151645, [151643, 151645])
        assert tok.chat == "chatml"
    else:
        assert (tok.n_vocab, tok.bos_id, tok.eos_id, tok.chat) == (32000, ref.encode("x").ids[0], 2, "llama2")


def hf_from_sentencepiece(file, template):
    """transformers' Llama tokenizer of a tokenizer.model, built as its converter does (which needs protobuf)."""
    spm, transformers = pytest.importorskip("sentencepiece"), pytest.importorskip("transformers")
    from transformers.tokenization_utils_base import generate_merges
    ref = spm.SentencePieceProcessor(model_file=str(file))
    vocab = {ref.id_to_piece(i): i for i in range(ref.get_piece_size())}
    merges = generate_merges(vocab, {p: ref.get_score(i) for p, i in vocab.items()})
    control = [p for p, i in vocab.items() if ref.is_control(i)]
    # legacy: every text between special tokens gets the dummy prefix, as sentencepiece and Meta's reference code do
    return transformers.LlamaTokenizer(vocab=vocab, merges=merges, legacy=True, chat_template=template,
                                       additional_special_tokens=control)


@pytest.mark.parametrize("name, file, template, chat", [
    ("llama-2", "tokenizer.model", LLAMA2_TEMPLATE, "llama2"),
    ("mistral-7b-v0.1", "tokenizer.json", MISTRAL_V1_TEMPLATE, "llama2"),
    ("mistral-7b-v0.3", "tokenizer.model", MISTRAL_V3_TEMPLATE, "mistral"),
    ("qwen3", "tokenizer.json", None, "chatml")], ids=["llama-2", "mistral-v0.1-json", "mistral-v0.3", "qwen3"])
def test_family_chat_prompts_match_apply_chat_template(family_dir, tmp_path, name, file, template, chat):
    transformers = pytest.importorskip("transformers")
    shutil.copy(family_dir / f"{name}.{file}", tmp_path / file)
    if template is None:  # Qwen's own tokenizer_config.json and template
        shutil.copy(family_dir / f"{name}.tokenizer_config.json", tmp_path / "tokenizer_config.json")
    else:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(dict(
            chat_template=template, bos_token="<s>", eos_token="</s>", tokenizer_class="PreTrainedTokenizerFast")))
    tok = Tokenizer.from_pretrained(tmp_path)
    assert tok.instruct and tok.chat == chat
    hf = hf_from_sentencepiece(tmp_path / file, template) if file.endswith("model") else (
        transformers.AutoTokenizer.from_pretrained(tmp_path))  # the real file as it is: tokenizers
    assert_chat_prompts_match(tok, hf)


def assert_chat_prompts_match(tok, hf):
    """prompt_ids in the chat format == transformers' apply_chat_template of the same user turn."""
    varied = "Two  spaces,\n\ta tab, 中文 and 🤖"
    cases = [("What is 2+2?", None, "What is 2+2?"),  # (instruction, judgment, the user's turn)
             (varied, "Wrong.", varied + "\n\n### Judgment:\nWrong.")]
    for instruction, judgment, content in cases:
        out = hf.apply_chat_template([{"role": "user", "content": content}], tokenize=True,
                                     add_generation_prompt=True)
        out = out if isinstance(out, list) else out["input_ids"]
        assert prompt_ids(tok, instruction, judgment, chat=True) == list(out)
    # control-token text in the user's turn stays text
    ids = prompt_ids(tok, "[INST] </s><s>[/INST] <|im_end|> <|eot_id|>", chat=True)
    assert sorted(i for i in ids if i in tok.special.values()) == sorted(
        i for i in prompt_ids(tok, "x", chat=True) if i in tok.special.values())


# ----------------------------------------------------------------------------- triples and the builder
X = "Sort the letters of 'dbac' alphabetically."
J = "The last two letters are swapped."
ACC = Triple(X, "The sorted letters are: a b c d.", None)
NEG = Triple(X, "The sorted letters are: a b d c.", J)


@pytest.fixture(scope="module")
def byte_tok():
    return Tokenizer.byte_level()


@pytest.fixture(scope="module")
def smol_tok(smollm2_dir):
    return Tokenizer.from_pretrained(smollm2_dir)


def check_rows(b, rows, pad_id):
    """Row r of the batch is (prompt + trained)[:-1], then padding; its targets are the trained
    ids, left-aligned, then -100; each is predicted at the position of the token before it."""
    for r, (p, t) in enumerate(rows):
        n = len(p) + len(t) - 1
        assert b.idx[r, :n].tolist() == (p + t)[:-1]
        assert (b.idx[r, n:] == pad_id).all()
        assert b.targets[r, :len(t)].tolist() == t and (b.targets[r, len(t):] == -100).all()
        assert b.positions[r, :len(t)].tolist() == list(range(len(p) - 1, n))
        assert b.idx[r, b.positions[r, 1:len(t)]].tolist() == t[:-1]


@pytest.mark.parametrize("which", ["byte", "smol"])
def test_response_ids_identical_across_a_triples_rows(which, request):
    tok = request.getfixturevalue(f"{which}_tok")
    resp = tok.encode(NEG.response) + [tok.eos_id]
    for chat in (False, True) if tok.chat else (False,):
        [e] = encode_triples(tok, [NEG], "cut", 4096, chat=chat)
        assert [t for _, t in e.rows] == [resp, resp]
        assert e.rows[0][0] == prompt_ids(tok, X, chat=chat)
        assert e.rows[1][0] == prompt_ids(tok, X, J, chat=chat)
        b = collate([e])
        spans = [row[row != -100].tolist() for row in b.targets]
        assert b.positions[0, 0] == len(e.rows[0][0]) - 1
        assert spans == [resp] * 2
        assert tok.decode(spans[0][:-1]) == NEG.response and spans[0][-1] == tok.eos_id


def test_smollm2_response_ids_match_reference_tokenizer(smol_tok, smollm2_dir):
    from tokenizers import Tokenizer as HFTokenizer
    ref = HFTokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    [e] = encode_triples(smol_tok, [NEG], "cut", 4096)
    assert e.rows[1][1] == ref.encode(NEG.response, add_special_tokens=False).ids + [ref.token_to_id("<|im_end|>")]


@pytest.mark.parametrize("which", ["byte", "smol"])
def test_truncation_cuts_the_prompts_left_and_keeps_bos_and_response(which, request):
    tok = request.getfixturevalue(f"{which}_tok")
    [full] = encode_triples(tok, [NEG], "cut", 4096)
    (p, t), (pj, _) = full.rows
    head = [tok.bos_id] if tok.bos_id is not None else []
    [same] = encode_triples(tok, [NEG], "cut", len(pj) + len(t) - 1)  # the longest row just fits
    assert same.rows == full.rows
    [cut] = encode_triples(tok, [NEG], "cut", len(t) + 19)  # room for 20 prompt tokens per row
    for (p0, t0), (p1, t1) in zip(full.rows, cut.rows):
        assert t1 == t0 and len(p1) + len(t1) - 1 == len(t) + 19
        assert p1 == head + p0[-(20 - len(head)):]
    assert tok.decode(cut.rows[0][0][len(head):]).endswith("### Response:\n")
    assert collate([cut]).idx.shape[1] == len(t) + 19


def test_too_long_response_is_dropped_and_counted(byte_tok, capsys):
    t = byte_tok.encode(NEG.response) + [byte_tok.eos_id]
    assert encode_triples(byte_tok, [ACC, NEG], "cut", len(t) - 1) == []
    assert "dropped 2 longer than" in capsys.readouterr().out
    [e] = encode_triples(byte_tok, [NEG], "cut", len(t))  # one prompt token left: BOS, or the prompt's last
    first = [byte_tok.bos_id] if byte_tok.bos_id is not None else prompt_ids(byte_tok, X)[-1:]
    assert [p for p, _ in e.rows] == [first, first] and [t1 for _, t1 in e.rows] == [t, t]


def test_row_structure_of_each_mode(byte_tok, capsys):
    tok, eos = byte_tok, byte_tok.eos_id
    y_acc, y_neg = tok.encode(ACC.response) + [eos], tok.encode(NEG.response) + [eos]
    plain = prompt_ids(tok, X)
    a, n = encode_triples(tok, [ACC, NEG], "cut", 4096)
    assert (a.rows, a.is_neg) == ([(plain, y_acc)], False)
    assert (n.rows, n.is_neg) == ([(plain, y_neg), (prompt_ids(tok, X, J), y_neg)], True)
    assert [e.rows for e in encode_triples(tok, [ACC, NEG], "sft", 4096)] == [[(plain, y_acc)]]
    assert "skipped 1 (sft" in capsys.readouterr().out
    assert [e.rows for e in encode_triples(tok, [ACC, NEG], "sft_all", 4096)] == [[(plain, y_acc)], [(plain, y_neg)]]
    a, n = encode_triples(tok, [ACC, NEG], "hindsight", 4096)
    assert a.rows == [(prompt_ids(tok, X, POSITIVE_JUDGMENT), y_acc)] and n.rows == [(prompt_ids(tok, X, J), y_neg)]
    assert len(a.rows) == len(n.rows) == 1
    a, n = encode_triples(tok, [ACC, NEG], "forward", 4096)
    assert a.rows[0] == (plain, y_acc) and len(n.rows) == 2
    for e, resp, judgment in ((a, ACC.response, POSITIVE_JUDGMENT), (n, NEG.response, J)):
        p, t = e.rows[1]
        assert t[-1] == eos and tok.decode(t[:-1]) == judgment
        assert p[:len(plain)] == plain and tok.decode(p[len(plain):]) == resp + "\n\n### Judgment:\n"
    with pytest.raises(ValueError, match="unknown mode"):
        encode_triples(tok, [ACC], "kto", 4096)


def test_collate_shapes_padding_and_row_indices(byte_tok):
    enc = encode_triples(byte_tok, [ACC, NEG, ACC], "cut", 4096)
    b = collate(enc, pad_id=7).to("cpu")
    rows = [r for e in enc for r in e.rows]
    assert b.idx.shape == (4, max(len(p) + len(t) for p, t in rows) - 1)
    assert b.targets.shape == b.positions.shape == (4, max(len(t) for _, t in rows))
    assert b.n_tokens == sum(len(p) + len(t) - 1 for p, t in rows)
    assert b.x_rows.tolist() == [0, 1, 3] and b.j_rows.tolist() == [0, 2, 3]
    assert b.is_neg.tolist() == [False, True, False] and b.idx.dtype == b.targets.dtype == b.positions.dtype == torch.long
    check_rows(b, rows, 7)


def write(path, records, jsonl):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n" if jsonl else json.dumps(records))
    return path


@pytest.mark.parametrize("jsonl", [False, True])
def test_load_triples_authors_format(tmp_path, capsys, jsonl):
    rec = lambda **kw: {"id": 0, "instruction": "x", "input": "", "output": "y", "judgment": None, **kw}
    records = [rec(), rec(input="more", judgment=""), rec(judgment="Perfect response."), rec(judgment="Bad", score=7),
               rec(judgment="Bad", score=3), rec(judgment="$ERROR$"), rec(judgment="Wrong")]
    got = load_triples(write(tmp_path / "a.json", records, jsonl))
    assert [t.judgment for t in got] == [None, None, None, None, "Bad", "Wrong"]
    assert got[1].instruction == "x\nmore" and got[0].instruction == "x" and got[0].response == "y"
    assert "loaded 6 triples (4 acceptable, 2 flawed), dropped 1 with a failed judge call ($ERROR$)" in capsys.readouterr().out


def test_load_triples_shepherd_and_plain(tmp_path):
    shep = [{"id": 0, "dataset": "d", "question": "q", "answer": "a", "feedback": "f"}]
    path = tmp_path / "s.jsonl"
    path.write_text(json.dumps(shep[0]) + "\n\n" + json.dumps(shep[0]) + "\n")
    assert load_triples(path) == [Triple("q", "a", "f")] * 2
    plain = [{"instruction": "x", "response": "y", "judgment": None}, {"instruction": "x", "response": "z", "judgment": "j"}]
    for jsonl in (False, True):
        assert load_triples(write(tmp_path / "p", plain, jsonl)) == [Triple("x", "y", None), Triple("x", "z", "j")]


GOOD = {"instruction": "x", "response": "y", "judgment": None}


@pytest.mark.parametrize("content, where, what", [
    (json.dumps(GOOD) + "\n{not json\n", "line 2", "not valid JSON"),
    (json.dumps([GOOD, {"instruction": "x", "response": "y"}]), "record 1", "'judgment'"),
    (json.dumps([GOOD, GOOD, {**GOOD, "response": 3}]), "record 2", "'response'"),
    ("\n".join(json.dumps(r) for r in [GOOD, GOOD, {"question": "q", "answer": "a", "feedback": ["f"]}]), "line 3", "'feedback'"),
    (json.dumps([{"instruction": "x", "input": "", "output": "y", "judgment": "j", "score": "9"}]), "record 0", "'score'"),
    (json.dumps({"question": "q", "answer": "a", "feedback": " "}), "line 1", "'feedback' is empty"),
    (json.dumps([{"instruction": "x", "output": 5, "judgment": None}]), "record 0", "'output'"),
    (json.dumps([GOOD, {"prompt": "x"}]), "record 1", "unknown record"),
    (json.dumps([GOOD, "x"]), "record 1", "JSON object"),
])
def test_load_triples_errors_name_file_record_and_field(tmp_path, content, where, what):
    path = tmp_path / "bad.data"
    path.write_text(content)
    with pytest.raises(ValueError) as err:
        load_triples(path)
    assert str(path) in str(err.value) and where in str(err.value) and what in str(err.value)


def test_load_triples_missing_or_empty_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_triples(tmp_path / "nope.json")
    for content in ("[]", json.dumps([{"instruction": "x", "output": "y", "judgment": "$ERROR$"}])):
        (tmp_path / "e.json").write_text(content)
        with pytest.raises(ValueError, match="no usable triples"):
            load_triples(tmp_path / "e.json")


def test_load_triples_real_files(shared_data):
    raw = json.loads((shared_data / "cut-online-iter1.json").read_text())
    err = [r for r in raw if r["judgment"] == "$ERROR$"]
    ok = [r for r in raw if r["judgment"] != "$ERROR$"]
    acceptable = [r for r in ok if not r["judgment"] or r["judgment"].startswith("Perfect") or r.get("score", 0) >= 7]
    assert (len(raw), len(err), len(acceptable), len(ok) - len(acceptable)) == (1000, 47, 713, 240)
    got = load_triples(shared_data / "cut-online-iter1.json")
    assert (len(got), sum(t.judgment is None for t in got)) == (953, 713)
    with_input = next(i for i, r in enumerate(ok) if r["input"])
    assert got[with_input].instruction == ok[with_input]["instruction"] + "\n" + ok[with_input]["input"]
    assert got[with_input].response == ok[with_input]["output"]
    shep = load_triples(shared_data / "shepherd-human-1317.jsonl")
    first = json.loads((shared_data / "shepherd-human-1317.jsonl").open().readline())
    assert len(shep) == 1317 and all(t.judgment for t in shep)
    assert shep[0] == Triple(first["question"], first["answer"], first["feedback"])


def test_split_is_deterministic_disjoint_and_leaves_global_rng_alone():
    triples = [Triple(f"x{i}", "y", None) for i in range(100)]
    state = torch.get_rng_state()
    train, val = split_triples(triples, 0.1, seed=3)
    assert torch.equal(state, torch.get_rng_state())
    assert (len(train), len(val)) == (90, 10)
    assert sorted(t.instruction for t in train + val) == sorted(t.instruction for t in triples)
    assert split_triples(triples, 0.1, seed=3) == (train, val)
    assert split_triples(triples, 0.1, seed=4)[1] != val
    assert split_triples(triples, 0.0)[1] == []


# ----------------------------------------------------------------------------- the built-in task
SORT_X = "Sort these letters alphabetically: q, d, m, a"  # sorted: a, d, m, q


@pytest.mark.parametrize("response, letters_at", [
    ("a, d, m, q", 0), ("a, d, m, q.", 0), ("Sorted: a, d, m, q.", 8), ("In alphabetical order: a, d, m, q", 23),
    ("Here they are in order: a, d, m, q.", 24), ("The sorted letters are a, d, m, q.", 23)])
def test_correct_in_every_response_phrasing(response, letters_at):
    assert response in [p.format("a, d, m, q") for p in TASK_RESPONSES]
    assert response[letters_at] == "a"
    v = check_response(SORT_X, response)
    assert (v.kind, v.judgment, v.wrong) == ("ok", None, [])
    assert check_response("Please sort the letters q, d, m, a in alphabetical order.", response).kind == "ok"


@pytest.mark.parametrize("response, kind, wrong", [
    ("Sorted: a, m, d, q.", "swap", [11, 14]),        # the systematic mistake: the second and third letters
    ("a, m, d, q", "swap", [3, 6]),
    ("Sorted: a, d, q, m.", "order", [14, 17]),       # breaks at the third letter
    ("d, a, m, q", "order", [0, 3]),
    ("q, m, d, a", "order", [0, 3, 6, 9]),
    ("Sorted: a, d, q.", "missing", [14]),            # m left out: q stands where m belongs
    ("a, d, m", "missing", [7]),                      # q left out: the list ends where q belongs (end of sequence)
    ("a, d, m.", "missing", [7]),                     # ... and here the full stop stands there
    ("d, m, q", "missing", [0]),
    ("a, d, m, q, z", "extra", [12]),
    ("a, d, d, m, q", "extra", [6]),                  # a repeated letter is one too many
    ("a, b, m, q", "extra", [3]),                     # b instead of d: an extra letter (and a missing one)
    ("", "garbage", []), ("I do not know.", "garbage", []), ("a", "garbage", []),
])
def test_checker_kinds_and_wrong_offsets(response, kind, wrong):
    v = check_response(SORT_X, response)
    assert (v.kind, v.wrong) == (kind, wrong)
    assert v.judgment and v.judgment[0].isupper() and v.judgment.endswith(".")


@pytest.mark.parametrize("response, named, unnamed", [
    ("a, d, k, q", "The third letter, 'k', was never given.", "The third letter was never given."),
    ("a, d, m, q, z", "The fifth letter, 'z', is not one of the letters given.",
     "The fifth letter is not one of the letters given."),
    ("a, d, d, m, q.", "The third letter, 'd', was already listed.", "The third letter was already listed."),
    ("a, z, d, m, y, q", "The second letter, 'z', was never given. The fifth letter, 'y', is not one of the "
     "letters given.", "The second letter was never given. The fifth letter is not one of the letters given."),
    ("Sorted: a, d, q.", "The third letter is missing.", "The third letter is missing."),
    ("a, d, q.", "Incomplete: the letter that belongs in the third place is missing.",
     "Incomplete: the letter that belongs in the third place is missing."),
    ("a, q. Done.", "One letter was left out: the second one.", "One letter was left out: the second one."),
    ("d, a, m, q", "The letters are out of order from the first, 'd', on.",
     "The letters are out of order from the first on."),
    ("a, d, q, m.", "Not sorted: it goes wrong from the third letter, 'q'.",
     "Not sorted: it goes wrong from the third letter."),
    ("a, m, d, q. Done.", "All in order but the second and third letters, 'm' and 'd': they should trade places.",
     "All in order but the second and third letters: they should trade places."),
])
def test_judgments_name_the_place_and_the_letter(response, named, unnamed):
    assert check_response(SORT_X, response).judgment == named  # hand-written, wording by crc32
    assert check_response(SORT_X, response, name_letters=False).judgment == unnamed


def test_instruction_without_letters_fails_clearly():
    with pytest.raises(ValueError, match="no comma-separated letter list"):
        check_response("Sort these letters.", "a, b")


def letters_of(instruction):
    return tuple(re.findall(r"\b[a-j]\b", instruction.split(JUDGMENT_HEADER)[0]))


def test_make_task_is_deterministic_and_its_splits_share_no_letter_list():
    a = make_task(300, seed=0)
    assert a == make_task(300, seed=0) and a != make_task(300, seed=1)
    lists = {s: {letters_of(t.instruction) for t in make_task(600, seed=5, split=s)} for s in ("train", "val", "test")}
    assert not lists["train"] & lists["val"] and not lists["train"] & lists["test"] and not lists["val"] & lists["test"]


def test_mixed_data_is_flawed_on_the_longest_lists_first():
    for frac in (0.25, 0.5, 0.8):
        triples = make_task(4000, seed=0, flawed_frac=frac)
        lengths = [(len(letters_of(t.instruction)), t.judgment is not None) for t in triples]
        share = lambda short: sum(f for n, f in lengths if (n < 5) == short) / sum((n < 5) == short for n, _ in lengths)
        assert abs(sum(f for _, f in lengths) / 4000 - frac) < 0.02
        assert abs(share(False) - min(1, 2 * frac)) < 0.03 and abs(share(True) - max(0, 2 * frac - 1)) < 0.03
    assert all(t.judgment is not None for t in make_task(50, seed=2, flawed_frac=1.0))
    assert all(t.judgment is None for t in make_task(50, seed=2, flawed_frac=0.0))


def test_base_data_makes_the_mistake_on_long_lists_and_reads_judgments():
    triples = make_task(4000, seed=3, kind="base")
    judged = [t for t in triples if JUDGMENT_HEADER in t.instruction]
    assert 0.47 < len(judged) / len(triples) < 0.53 and all(t.judgment is None for t in judged)
    kinds = []
    for t in judged:  # the judgment in the prompt is the one the checker writes for the response it precedes
        x, j = t.instruction.split(JUDGMENT_HEADER)
        assert check_response(x, t.response).judgment == j
        kinds.append(check_response(x, t.response).kind)
    # every kind of mistake, at every place: never-given letters and repeated ones among the extra ones
    shares = {k: kinds.count(k) / len(kinds) for k in ("extra", "missing", "swap", "order")}
    assert shares == pytest.approx({"extra": 0.65, "missing": 0.1, "swap": 0.17, "order": 0.08}, abs=0.03)
    said = " ".join(t.instruction for t in judged)
    assert said.count("was never given") + said.count("not one of the letters given") > 0.45 * len(judged)
    assert said.count("already listed") + said.count("repeats an earlier") > 0.12 * len(judged)
    assert {"the sixth", "the first"} <= set(re.findall(r"the [a-z]+", said))
    plain = [(len(letters_of(t.instruction)), check_response(t.instruction, t.response).kind) for t in triples
             if t not in judged]
    assert all(kind == "ok" for n, kind in plain if n < 5)
    long = [kind for n, kind in plain if n >= 5]
    assert set(long) == {"ok", "swap"} and 0.2 < long.count("swap") / len(long) < 0.3


def test_new_format_data_is_all_flawed_and_only_it_has_the_new_format():
    new = make_task(500, seed=4, kind="new")
    assert all(t.judgment and NEW_FORMAT.fullmatch(t.response) for t in new)
    kinds = [check_response(t.instruction, t.response).kind for t in new]
    assert set(kinds) == {"swap", "missing"} and 0.15 < kinds.count("missing") / len(kinds) < 0.25
    for kind in ("base", "mixed"):
        assert not any(NEW_FORMAT.fullmatch(t.response) for t in make_task(500, seed=4, kind=kind))


def test_generated_triples_agree_with_the_checker():
    triples = make_task(2000, seed=3, flawed_frac=0.5)
    kinds = [check_response(t.instruction, t.response).kind for t in triples]
    assert 900 < kinds.count("ok") < 1100 and set(kinds) == {"ok", "swap", "missing"}
    assert 0.15 < kinds.count("missing") / (2000 - kinds.count("ok")) < 0.25  # a fifth of the flawed ones
    for (x, y, j), kind in zip(((t.instruction, t.response, t.judgment) for t in triples), kinds):
        assert check_response(x, y).judgment == j                       # the checker wrote the judgment
        assert (j is None) == (kind == "ok")
        assert len(x) < 100 and len(y) < 100 and x.isascii() and y.isascii()
        if j is not None:
            assert len(j) < 100 and set(re.findall(r"'([a-z])'", j)) <= set(letters_of(x))  # the letters named
    assert len({j for j in (t.judgment for t in triples) if j}) >= len(TASK_JUDGMENTS["swap"]) + 3  # the wording varies
    shapes = {re.sub(r"[a-z](, [a-z])+", "#", t.response) for t in triples}  # wordings and remarks: no judgment's topic
    assert len(shapes) == len(TASK_RESPONSES) * (len(set(TASK_REMARKS)))


def test_no_wording_contains_a_single_letter_word():
    for wordings in TASK_JUDGMENTS.values():
        for w in wordings:
            assert not re.findall(r"\b[A-Za-z]\b", w.format(place="third", named="")), w  # letters only as named


# ----------------------------------------------------------------------------- the programs' settings
@dataclasses.dataclass
class Settings:
    out_dir: str = "out"
    lam: float = 1.1
    max_iters: int = 300
    compile: bool = False
    chat: str = "auto"
    device: str = "cpu"


def test_configure_file_then_flags(tmp_path):
    file = tmp_path / "run.json"
    file.write_text(json.dumps({"lam": 2, "max_iters": 10, "out_dir": "a"}))
    cfg = configure(Settings(), [str(file), "--max_iters=20", "--chat=yes"])
    assert cfg == Settings(out_dir="a", lam=2.0, max_iters=20, chat="yes")
    assert type(cfg.lam) is float and Settings().max_iters == 300  # an int is taken for a float; defaults untouched
    assert configure(Settings(), ["--max_iters=5", str(file)]).max_iters == 10  # later wins
    assert configure(Settings(), ["--lam=1", "--lam=1.5e0"]).lam == 1.5


@pytest.mark.parametrize("flag, value", [("True", True), ("true", True), ("False", False), ("false", False)])
def test_configure_bools(flag, value):
    assert configure(Settings(), [f"--compile={flag}"]).compile is value


@pytest.mark.parametrize("text", ["123", "1e3", "True", "None", "[1, 2]", "'quoted'", "gate_proj,up_proj"])
def test_configure_str_takes_text_verbatim(text):
    assert configure(Settings(), [f"--out_dir={text}"]).out_dir == text


@pytest.mark.parametrize("argv, message", [
    (["--max_iters=1.5"], "'max_iters'.*expected int, got 1.5"),
    (["--max_iters=True"], "'max_iters'.*expected int, got True"),
    (["--max_iters=ten"], "'max_iters'.*expected int, got 'ten'"),
    (["--max_iters=0"], "config key 'max_iters': expected > 0, got 0"),
    (["--lam=yes"], "'lam'.*expected float"),
    (["--lam=0.5"], "config key 'lam': expected >= 1"),
    (["--compile=1"], "'compile'.*expected bool, got 1"),
    (["--compile=yes"], "'compile'.*expected bool"),
    (["--out_dir="], "config key 'out_dir': expected a directory, got ''"),
    (["--device=cuda:7"], r"config key 'device': expected .* on a GPU torch sees \(\d+ here\), got 'cuda:7'"),
    (["--device=bogus"], r"config key \'device\': expected cpu, or cuda or cuda:N on a GPU torch sees \(\d+ here\), got 'bogus'"),
    (["--nope=1"], r"unknown config key 'nope' \(from --nope=1\); known keys: out_dir, lam, max_iters, compile, chat"),
    (["--lam"], "argument '--lam': expected --key=value"),
    (["missing.json"], "config file missing.json"),
])
def test_configure_errors(argv, message):
    with pytest.raises(ValueError, match=message):
        configure(Settings(), argv)


def test_configure_file_errors(tmp_path):
    bad = tmp_path / "bad.json"
    for text, message in [('{"max_iters": "10"}', "'max_iters' \\(from .*bad.json\\): expected int, got '10'"),
                          ('{"nope": 1}', "unknown config key 'nope' \\(from .*bad.json\\); known keys"),
                          ('{"lam": ', "config file .*bad.json"), ('[1]', "expected a JSON object of settings")]:
        bad.write_text(text)
        with pytest.raises(ValueError, match=message):
            configure(Settings(), [str(bad)])


def test_split_keeps_copies_of_a_triple_together():
    triples = [Triple(f"x{i % 30}", "y", None) for i in range(90)]  # 30 triples, each three times
    train, val = split_triples(triples, 0.2, seed=0)
    assert len(val) == len(set(val)) == 6 and not set(val) & set(train) and len(train) == 72


def test_failed_judge_calls_are_dropped_in_every_format(tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in [
        {"question": "q", "answer": "a", "feedback": "$ERROR$"}, {"question": "q", "answer": "a", "feedback": "Bad."},
        {"instruction": "q", "response": "a", "judgment": "$ERROR$"},
        {"instruction": "q", "response": "b", "judgment": None},
        {"instruction": "q", "input": "", "output": "a", "judgment": "$ERROR$"}]))
    assert load_triples(f, verbose=False) == [Triple("q", "a", "Bad."), Triple("q", "b", None)]
