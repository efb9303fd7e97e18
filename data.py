"""Text to ids: prompt templates, triples into the sequences each loss trains on, and batches.

model.py turns ids into logits and cut_loss.py turns response log-probs into a loss; this file is
everything before the model: write the prompts (the paper's Alpaca templates, or the checkpoint's
chat format), build from each (instruction, response, judgment) triple the Align-P, Align-N and
Misalign sequences of the paper (docs/cut.md), and pad them into one batch. File formats: support/.
"""
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from model import Transformer
from support.tokenizer import CHAT_FORMATS, Tokenizer
from support.triple_files import Triple

# the paper's templates: an instruction, or an instruction and a judgment of the response to come
PLAIN = ("Below is an instruction that describes a task. Write a response that appropriately "
         "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
JUDGED = ("Below is an instruction that describes a task. Write a response to the instruction and "
          "the response should match the corresponding judgment.\n\n"
          "### Instruction:\n{instruction}\n\n### Judgment:\n{judgment}\n\n### Response:\n")
# each trains on its own sequences (encode_triples); ilf_*: on a refinement, dpo: on a pair
LOSS_MODES = ("cut", "sft", "sft_all", "hindsight", "forward", "ilf_mle", "ilf_dpo", "dpo")
PAIRED = ("ilf_dpo", "dpo")  # a preferred and a dispreferred response to one prompt
POSITIVE_JUDGMENT = "Your response to the instruction is satisfactory."
JUDGMENT_HEADER = "\n\n### Judgment:\n"  # forward prediction: the judgment is trained after [x, y]


def use_chat(tok, chat):
    """The `chat` setting as a bool: 'auto' (if the checkpoint has a chat template), 'yes', 'no'."""
    return tok.instruct if chat == "auto" else chat == "yes"


def load_checkpoint(path, dtype=torch.float32, device="cpu"):
    """(model, tokenizer) of a checkpoint directory: Hugging Face, Meta, or a train.py out_dir."""
    if not Path(path).is_dir():
        raise FileNotFoundError(f"{path}: no such checkpoint directory")
    # the model first, as it finishes an interrupted save
    model = Transformer.from_pretrained(path, dtype=dtype, device=device)
    tok = Tokenizer.from_pretrained(path)
    if tok.n_vocab > model.cfg.vocab_size:
        raise ValueError(f"{path}: the tokenizer has {tok.n_vocab} tokens, the model's vocab_size "
                         f"is only {model.cfg.vocab_size}")
    return model, tok


def prompt_ids(tok, instruction, judgment=None, chat=False):
    """[BOS] + PLAIN (judgment None) or JUDGED. chat=True: one user turn of the chat format instead,
    the instruction (then JUDGMENT_HEADER and the judgment), then the assistant's header."""
    ids = [] if tok.bos_id is None else [tok.bos_id]
    if not chat:
        if judgment is None:
            return ids + tok.encode(PLAIN.format(instruction=instruction))
        return ids + tok.encode(JUDGED.format(instruction=instruction, judgment=judgment))
    if tok.chat is None:
        raise ValueError("chat=True, but the tokenizer has no chat format of "
                         f"{', '.join(CHAT_FORMATS)}; set chat 'no'")
    content = instruction if judgment is None else instruction + JUDGMENT_HEADER + judgment
    # special tokens are looked up, never parsed from text, so the user's text stays text
    text = ""  # the text between two special tokens, encoded in one piece (Llama 2's [INST])
    for part in re.split(r"(<\|\w+\|>|\[/?INST\])", CHAT_FORMATS[tok.chat][2]):
        if part not in tok.special:
            text += part
            continue
        if text:
            ids += tok.encode(text.replace("{content}", content))
        ids.append(tok.special[part])
        text = ""
    if text:
        ids += tok.encode(text.replace("{content}", content))
    return ids


def split_triples(triples: list[Triple], val_frac: float = 0.1, seed: int = 0):
    """(train, val): a random permutation of the distinct triples, drawn from the seed alone (no
    global RNG state). Copies of a triple stay together: validation never holds a trained triple."""
    distinct = list(dict.fromkeys(triples))
    order = torch.randperm(len(distinct), generator=torch.Generator().manual_seed(seed)).tolist()
    val = {distinct[i] for i in order[:round(len(distinct) * val_frac)]}
    train = [t for t in triples if t not in val]
    return train, [distinct[i] for i in order if distinct[i] in val]


@dataclass
class Encoded:
    # (prompt ids, trained ids) per row: x -> y, then [x, j-] -> y (cut) or [x, y] -> j (forward)
    rows: list[tuple[list[int], list[int]]]
    is_neg: bool


def _fit(prompt: list[int], trained: list[int], max_len: int, bos_id: int | None):
    """Cut the prompt from the left (keeping BOS): idx = (prompt + trained)[:-1] fits max_len."""
    budget = max_len + 1 - len(trained)  # prompt tokens allowed; at least one to predict from
    if budget < 1:
        return None
    if len(prompt) <= budget:
        return prompt, trained
    head = [bos_id] if bos_id is not None and prompt[0] == bos_id else []
    keep = budget - len(head)
    return head + (prompt[-keep:] if keep else []), trained


def encode_triples(tok: Tokenizer, triples: list[Triple], mode: str, max_len: int,
                   chat: bool = False, verbose=True) -> list[Encoded]:
    """The sequences each loss mode trains on (docs/cut.md), a row's model input <= max_len. sft
    skips flawed triples; ilf_mle, dpo and ilf_dpo those they have no refinement for."""
    if mode not in LOSS_MODES:
        raise ValueError(f"unknown mode {mode!r}, expected one of {LOSS_MODES}")
    out = []
    too_long = 0
    skipped = 0
    for t in triples:
        is_neg = t.judgment is not None
        if t.refinement is not None and not is_neg and mode not in PAIRED:
            raise ValueError(f"a preference pair (prompt {t.instruction[:40]!r}) trains with "
                             "--loss=dpo only")
        unrefined = (mode in PAIRED or (mode == "ilf_mle" and is_neg)) and t.refinement is None
        if (mode == "sft" and is_neg) or unrefined:
            skipped += 1
            continue
        response = tok.encode(t.response)  # once: every row of the triple trains the same ids
        y = response + [tok.eos_id]
        plain = prompt_ids(tok, t.instruction, chat=chat)
        rows = [(plain, y)]
        if mode == "ilf_mle" and is_neg:
            rows = [(plain, tok.encode(t.refinement) + [tok.eos_id])]
        elif mode in PAIRED:  # the preferred row first: x_rows, then j_rows the dispreferred
            rows.insert(0, (plain, tok.encode(t.refinement) + [tok.eos_id]))
        elif mode == "hindsight":
            judged = prompt_ids(tok, t.instruction, t.judgment or POSITIVE_JUDGMENT, chat=chat)
            rows = [(judged, y)]
        elif mode == "cut" and is_neg:  # Misalign is the x -> y row itself: j+ is no judgment
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
        n_rows = sum(len(e.rows) for e in out)
        print(f"encoded {len(out)} triples for {mode} ({n_rows} sequences), dropped {too_long} "
              f"longer than {max_len} tokens, skipped {skipped} ({mode}: see encode_triples)")
    return out


@dataclass
class Batch:
    idx: torch.Tensor  # (R, T) input ids, right-padded
    positions: torch.Tensor  # (R, N) the position of idx that predicts each trained token
    targets: torch.Tensor  # (R, N) the trained ids y (+ EOS), left-aligned, -100 on padding
    mask: torch.Tensor  # (R, N) float: 1 on the trained ids, 0 on padding (cut_loss.py's mask)
    x_rows: torch.Tensor  # (B,) row of each triple's x -> y sequence
    j_rows: torch.Tensor  # (B,) row of each triple's judgment sequence (== x_rows where none)
    is_neg: torch.Tensor  # (B,) bool: the triple is flawed
    n_tokens: int  # the real tokens of idx, counted here: no device sync to count them

    def to(self, device) -> "Batch":
        # from pinned host memory the copy runs beside the GPU's work instead of waiting for it
        pin = lambda v: v.pin_memory() if torch.device(device).type == "cuda" else v
        return replace(self, **{k: pin(v).to(device, non_blocking=True)
                                for k, v in vars(self).items() if k != "n_tokens"})


def collate(encoded: list[Encoded], pad_id: int = 0) -> Batch:
    """Every triple's rows in one right-padded tensor, idx = (prompt + trained)[:-1]; where each
    trained token sits, known here on the CPU, so that the model needs no boolean indexing."""
    if not encoded:
        raise ValueError("collate needs at least one encoded triple")
    rows, x_rows, j_rows = [], [], []
    for e in encoded:
        x_rows.append(len(rows))
        j_rows.append(len(rows) + len(e.rows) - 1)
        rows += e.rows
    T = max(len(p) + len(t) for p, t in rows) - 1
    N = max(len(t) for _, t in rows)
    idx = torch.full((len(rows), T), pad_id, dtype=torch.long)
    positions = torch.zeros(len(rows), N, dtype=torch.long)
    targets = torch.full((len(rows), N), -100, dtype=torch.long)
    for r, (p, t) in enumerate(rows):
        seq = p + t
        idx[r, :len(seq) - 1] = torch.tensor(seq[:-1])
        positions[r, :len(t)] = torch.arange(len(p) - 1, len(seq) - 1)
        targets[r, :len(t)] = torch.tensor(t)
    is_neg = torch.tensor([e.is_neg for e in encoded])
    return Batch(idx, positions, targets, (targets != -100).float(), torch.tensor(x_rows),
                 torch.tensor(j_rows), is_neg, n_tokens=sum(len(p) + len(t) - 1 for p, t in rows))
