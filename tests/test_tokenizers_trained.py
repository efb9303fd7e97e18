"""Every tokenizer family on a clone without ../shared: tokenizers trained here, in a temp dir, by
the reference libraries, each compared with its library on the varied corpus and in chat prompts.
SentencePiece BPE with byte fallback (Llama 2's and Mistral v0.3's settings) and its Hugging Face
tokenizer.json, byte-level BPE (GPT-2's and Llama 3's pre-tokenizers, ChatML and Llama 3's chat
tokens), and a Llama 3 rank file (Meta's tokenizer.model) made of one of them."""
import io
import json
import shutil

import pytest

from conftest import llama3_pre_tokenizer
from support.tokenizer import Tokenizer
from test_data import (CORPUS, LLAMA2_TEMPLATE, MISTRAL_V3_TEMPLATE, assert_chat_prompts_match,
                       hf_from_sentencepiece, varied_corpus)

spm = pytest.importorskip("sentencepiece")
tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")
from tokenizers import decoders, normalizers, pre_tokenizers, processors  # noqa: E402
from transformers.convert_slow_tokenizer import TikTokenConverter  # noqa: E402
from transformers.tokenization_utils_base import generate_merges  # noqa: E402

TEXTS = varied_corpus() + CORPUS
CHATML_TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
                   "'<|im_end|>\n' }}{% endfor %}"
                   "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3_TEMPLATE = (  # Llama 3 Instruct's, without its system turn
    "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + "
    "'<|end_header_id|>\n\n' + m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}")
# Meta's names of Llama 3's 256 special tokens, from id len(ranks) on
LLAMA3_NAMES = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>",
                "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
                "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
LLAMA3_NAMES += [f"<|reserved_special_token_{i}|>" for i in range(3, 248)]


def assert_same_ids(tok, encode, decode, texts):
    """Our ids and decoding equal the reference's on every text; the share that round-trips."""
    round_trips = 0
    for text in texts:
        ids = tok.encode(text)
        assert ids == encode(text), text[:80]
        assert tok.decode(ids) == decode(ids), text[:80]
        round_trips += tok.decode(ids) == text
    return round_trips / len(texts)


# ----------------------------------------------------------------------------- SentencePiece
@pytest.fixture(scope="module", params=["llama2", "mistral"])
def sentencepiece_dir(request, tmp_path_factory):
    """A SentencePiece BPE trained on the corpus with Llama 2's settings; Mistral v0.3 adds its
    [INST] and [/INST] as control tokens. The directory holds tokenizer.model alone."""
    model = io.BytesIO()
    controls = ["[INST]", "[/INST]"] if request.param == "mistral" else []
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXTS), model_writer=model, model_type="bpe", vocab_size=1000,
        byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        character_coverage=0.98, control_symbols=controls, minloglevel=2)
    path = tmp_path_factory.mktemp(f"sp-{request.param}")
    (path / "tokenizer.model").write_bytes(model.getvalue())
    return path, request.param


def test_sentencepiece_matches_sentencepiece(sentencepiece_dir):
    path, chat = sentencepiece_dir
    ref = spm.SentencePieceProcessor(model_file=str(path / "tokenizer.model"))
    tok = Tokenizer.from_pretrained(path)
    merged = sum(len(ref.id_to_piece(i)) > 1 and not ref.is_byte(i) for i in range(1000))
    assert merged > 200  # BPE merges, not characters alone
    share = assert_same_ids(tok, ref.encode, ref.decode, TEXTS + ["\n".join(TEXTS)])
    assert share > 0.9  # byte fallback spells out what the pieces lack
    assert (tok.n_vocab, tok.bos_id, tok.eos_id, tok.stop_ids) == (1000, 1, 2, [2])
    control = {i for i in range(1000) if ref.is_control(i) or ref.is_unknown(i)}
    assert set(tok.special.values()) == control
    assert tok.chat == chat and not tok.instruct


def test_sentencepiece_tokenizer_json_matches_tokenizers(sentencepiece_dir, tmp_path):
    """Hugging Face's form of a SentencePiece BPE (Llama 2's and Mistral v0.1's tokenizer.json):
    a Prepend and Replace normalizer, byte fallback, BOS from the post-processor."""
    path, _ = sentencepiece_dir
    sp = spm.SentencePieceProcessor(model_file=str(path / "tokenizer.model"))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    merges = generate_merges(vocab, {p: sp.get_score(i) for p, i in vocab.items()})
    ref = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, merges, unk_token="<unk>",
                                                     byte_fallback=True, fuse_unk=True))
    ref.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                           normalizers.Replace(" ", "▁")])
    ref.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    ref.add_special_tokens([p for p, i in vocab.items() if sp.is_control(i) or sp.is_unknown(i)])
    ref.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    ref.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.from_pretrained(tmp_path / "tokenizer.json")
    texts = [t for t in TEXTS if not any(s in t for s in tok.special)]  # it parses them, we do not
    assert_same_ids(tok, lambda t: ref.encode(t, add_special_tokens=False).ids, ref.decode, texts)
    assert all(tok.encode(t) == sp.encode(t) for t in texts)
    assert (tok.n_vocab, tok.bos_id, tok.eos_id) == (1000, ref.encode("x").ids[0], 2)


def test_sentencepiece_chat_prompts_match_apply_chat_template(sentencepiece_dir, tmp_path):
    path, chat = sentencepiece_dir
    template = {"llama2": LLAMA2_TEMPLATE, "mistral": MISTRAL_V3_TEMPLATE}[chat]
    shutil.copy(path / "tokenizer.model", tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(dict(
        chat_template=template, bos_token="<s>", eos_token="</s>")))
    tok = Tokenizer.from_pretrained(tmp_path)
    assert tok.instruct and tok.chat == chat
    assert_chat_prompts_match(tok, hf_from_sentencepiece(tmp_path / "tokenizer.model", template))


# ----------------------------------------------------------------------------- byte-level BPE
BYTE_LEVEL = {  # chat format -> (pre-tokenizer, special tokens, BOS, chat template)
    "chatml": (pre_tokenizers.ByteLevel(add_prefix_space=False),
               ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, CHATML_TEMPLATE),
    # Llama 3's tokenizer.json: its split pattern, then the bytes; and Qwen's NFC
    "llama3": (llama3_pre_tokenizer(), LLAMA3_NAMES[:10], "<|begin_of_text|>", LLAMA3_TEMPLATE)}


@pytest.fixture(scope="module", params=list(BYTE_LEVEL))
def byte_level_dir(request, tmp_path_factory):
    """A byte-level BPE trained on the corpus, with its chat template and special tokens."""
    pre_tokenizer, specials, bos, template = BYTE_LEVEL[request.param]
    ref = tokenizers.Tokenizer(tokenizers.models.BPE())
    ref.pre_tokenizer = pre_tokenizer
    ref.decoder = decoders.ByteLevel()
    if bos:
        ref.normalizer = normalizers.NFC()
        ref.post_processor = processors.TemplateProcessing(single=f"{bos} $A",
                                                           special_tokens=[(bos, 0)])
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=800, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    ref.train_from_iterator(TEXTS, trainer)
    path = tmp_path_factory.mktemp(f"bl-{request.param}")
    ref.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(dict(
        chat_template=template, bos_token=bos, eos_token=specials[-1],
        tokenizer_class="PreTrainedTokenizerFast")))
    return path, request.param


def test_byte_level_matches_tokenizers_and_apply_chat_template(byte_level_dir):
    path, chat = byte_level_dir
    ref = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
    tok = Tokenizer.from_pretrained(path)
    texts = [t for t in TEXTS if not any(s in t for s in tok.special)]
    texts.append("\n".join(texts))
    share = assert_same_ids(tok, lambda t: ref.encode(t, add_special_tokens=False).ids,
                            ref.decode, texts)
    assert share == 1.0 if chat == "chatml" else share > 0.95  # NFC changes some texts
    assert max(map(len, ref.get_vocab())) > 4  # merges, not bytes alone
    eos = ref.token_to_id("<|im_end|>" if chat == "chatml" else "<|eot_id|>")
    bos = None if chat == "chatml" else ref.encode("x").ids[0]
    assert (tok.n_vocab, tok.bos_id, tok.eos_id, tok.chat, tok.instruct) == (
        800, bos, eos, chat, True)
    assert tok.nfc == (chat == "llama3")
    assert_chat_prompts_match(tok, transformers.AutoTokenizer.from_pretrained(path))


# ----------------------------------------------------------------------------- Llama 3's rank file
def test_llama3_rank_file_ids_special_tokens_and_chat_format(small_llama3_file):
    ref = TikTokenConverter(vocab_file=str(small_llama3_file),
                            extra_special_tokens=LLAMA3_NAMES).converted()
    tok = Tokenizer.from_pretrained(small_llama3_file)
    texts = [t for t in TEXTS if not any(s in t for s in tok.special)]
    share = assert_same_ids(tok, lambda t: ref.encode(t, add_special_tokens=False).ids,
                            ref.decode, texts + ["\n".join(texts)])
    assert share == 1.0
    n = 600  # the ranks; then <|begin_of_text|> n, <|end_of_text|> n + 1, ..., <|eot_id|> n + 9
    assert [tok.decode([n + k]) for k in (0, 1, 6, 7, 8, 9, 255)] == [
        "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
        "<|eom_id|>", "<|eot_id|>", "<|reserved_special_token_247|>"]
    assert (tok.n_vocab, tok.bos_id, tok.eos_id, tok.stop_ids) == (n + 256, n, n + 9,
                                                                   [n + 1, n + 8, n + 9])
    assert tok.chat == "llama3" and not tok.instruct
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=ref, bos_token="<|begin_of_text|>",
                                              chat_template=LLAMA3_TEMPLATE)
    assert_chat_prompts_match(tok, hf)
