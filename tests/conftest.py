"""Shared fixtures: the real assets (built by ../shared/tools, paths from the environment) and
data files. Shared helpers: a deadline for polling loops, and log-probs and CUT's loss by hand
(an explicit log-softmax, the paper's formula)."""
import base64
import os
import time
from pathlib import Path

import pytest

# before torch loads OpenMP: its spinning threads made small CPU ops up to 20x slower on 2 cores (measured)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch

import train

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def smollm2_dir():
    path = os.environ.get("CUT_SMOLLM2")
    if not path or not Path(path, "model.safetensors").exists():
        pytest.skip("set CUT_SMOLLM2 to a directory built by ../shared/tools/get_smollm2.sh")
    return Path(path)


@pytest.fixture(scope="session")
def llama3_tokenizer_file():
    path = os.environ.get("CUT_LLAMA3_TOKENIZER")
    if not path or not Path(path).exists():
        pytest.skip("set CUT_LLAMA3_TOKENIZER to a file built by ../shared/tools/get_llama3_tokenizer.sh")
    return Path(path)


@pytest.fixture(scope="session")
def family_dir():
    path = os.environ.get("CUT_FAMILY_TOKENIZERS")
    if not path or not Path(path, "llama-2.tokenizer.model").exists():
        pytest.skip("set CUT_FAMILY_TOKENIZERS to a directory built by ../shared/tools/get_family_tokenizers.sh")
    return Path(path)


@pytest.fixture(scope="session")
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is absent")
    return SHARED_DATA


def llama3_pre_tokenizer():
    """Llama 3's tokenizer.json pre-tokenizer: its split pattern, then the bytes."""
    tokenizers = pytest.importorskip("tokenizers")
    convert = pytest.importorskip("transformers.convert_slow_tokenizer")
    pattern = tokenizers.Regex(convert.TikTokenConverter().pattern)  # Llama 3's
    return tokenizers.pre_tokenizers.Sequence([
        tokenizers.pre_tokenizers.Split(pattern, "isolated"),
        tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


@pytest.fixture(scope="session")
def small_llama3_file(tmp_path_factory):
    """Meta's Llama 3 format, "base64(token bytes) rank" a line, of a byte-level BPE that the
    tokenizers library trains here on test_data's corpus with Llama 3's pre-tokenizer: runs on
    a clone without ../shared. Its special tokens come after the ranks, by Meta's names."""
    tokenizers = pytest.importorskip("tokenizers")
    convert = pytest.importorskip("transformers.convert_slow_tokenizer")
    from test_data import CORPUS, varied_corpus
    ref = tokenizers.Tokenizer(tokenizers.models.BPE())
    ref.pre_tokenizer = llama3_pre_tokenizer()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=600, show_progress=False,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    texts = varied_corpus() + CORPUS + ["The sorted letters are a, b, d, c."] * 50
    ref.train_from_iterator(texts, trainer)
    byte_of = {c: b for b, c in convert.bytes_to_unicode().items()}
    tokens = sorted(ref.get_vocab().items(), key=lambda item: item[1])
    file = tmp_path_factory.mktemp("llama3") / "tokenizer.model"
    file.write_text("".join(f"{base64.b64encode(bytes(byte_of[c] for c in t)).decode()} {i}\n"
                            for t, i in tokens))
    return file


def wait_until(condition, procs=(), timeout=120, what="the condition"):
    """Poll condition() until it holds: a regression fails after timeout seconds, or as soon as
    one of procs (subprocess.Popen) ends first, instead of hanging the suite."""
    deadline = time.monotonic() + timeout
    while not condition():
        for proc in procs:
            if proc.poll() is not None:
                err = (proc.communicate()[1] or "")[-2000:]
                pytest.fail(f"a process ended (exit {proc.returncode}) before {what}: {err}")
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.05)


def token_logps(model, prompt, trained):
    """log p(trained[t] | prompt, trained[:t]) for each t, by an explicit log-softmax of the
    logits of one unpadded row: a reference for the model's batched, chunked log-probs."""
    idx = torch.tensor([prompt + trained[:-1]])
    logp = torch.log_softmax(model(idx)[0].float(), dim=-1)
    positions = torch.arange(len(prompt) - 1, len(idx[0]))
    return logp[positions, torch.tensor(trained)]


def cut_by_hand(model, triple, lam, alpha, gamma):
    """Paper Eqs. 5-8 for one triple, p_p = p_x: (loss, tokens in U, flawed tokens)."""
    logp_x = token_logps(model, *triple.rows[0])
    n = len(logp_x)
    if not triple.is_neg:  # L2 alone: -(1/N) sum log p(y_t | x)
        return -logp_x.sum() / n, 0, 0
    logp_n = token_logps(model, *triple.rows[1])
    p_x, p_n = logp_x.exp(), logp_n.exp()
    in_u = (p_n - lam * p_x > 0).detach()
    weight = alpha * p_n.detach() ** gamma
    l1 = -torch.where(in_u, weight * torch.log(1 - p_x), logp_x).sum() / n
    return l1 - logp_n.sum() / n, int(in_u.sum()), n


def cut_micro_steps_by_hand(model, encoded, it, cfg):
    """Iteration it's micro-steps in one process (train.micro_batches): for each, CUT's loss by
    hand, the mean over its triples, weighted by its share of the iteration's triples (micro-steps
    differ in size), and the share of its flawed tokens in U, weighted the same."""
    out = []
    per_iter = cfg.batch_size * cfg.gradient_accumulation_steps
    for step in train.micro_batches(encoded, it, cfg, 0, 1):
        terms = [cut_by_hand(model, t, cfg.lam, cfg.alpha, cfg.gamma) for t in step]
        loss = sum(t[0] for t in terms) / len(terms)
        frac = sum(t[1] for t in terms) / max(1, sum(t[2] for t in terms))
        out.append((loss * len(step) / per_iter, frac * len(step) / per_iter))
    return out
