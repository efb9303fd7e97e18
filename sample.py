"""Quick checks: continue a prompt with a checkpoint, streaming the text as the tokens come.

    python sample.py --ckpt=out --prompt="What is the capital of France?" --temperature=0
    echo "Name three primes." | python sample.py --ckpt=/path/to/hf_or_meta_dir run.json --top_p=0.9

The prompt is wrapped in the model's chat format (chat='auto': when the checkpoint ships a chat
template) or in the paper's plain Alpaca template. The text goes to stdout, the timing to stderr.
One sample streams as it comes; --num_samples=N samples N continuations as one batch.
"""
import os
import sys
import time
from dataclasses import dataclass

# before torch loads OpenMP: its spinning threads made small CPU ops up to 20x slower on 2 cores
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

from data import load_checkpoint, prompt_ids, use_chat
from support.settings import configure, run_program
from support.triple_files import read_text


@dataclass
class Config:  # every key can be set by --key=value or a JSON config file
    ckpt: str = "out"             # a Hugging Face or Meta directory, or train.py's out_dir
    prompt: str = ""              # the instruction; 'FILE:path' reads a file, '' or '-' reads stdin
    chat: str = "auto"            # 'yes': the chat format, 'no': the Alpaca template, 'auto'
    num_samples: int = 1
    max_new_tokens: int = 256
    temperature: float = 0.8      # 0: greedy
    top_k: int = 0                # 0: off
    top_p: float = 1.0            # 1.0: off
    seed: int = 1337
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    dtype: str = "bfloat16" if torch.cuda.is_available() else "float32"


def read_prompt(prompt):
    if prompt.startswith("FILE:"):
        return read_text(prompt.removeprefix("FILE:"), "prompt file").strip()
    return sys.stdin.read().strip() if prompt in ("", "-") else prompt


def stream(model, tok, x, c):
    """Generate after x (1, T), printing the text as it comes; returns each token's arrival time."""
    ids = []
    times = []
    shown = ""

    def on_token(nxt):
        nonlocal shown
        times.append(time.perf_counter())
        if nxt.item() in tok.stop_ids:
            return
        ids.append(nxt.item())
        text = tok.decode(ids)
        if not text.endswith("\ufffd"):  # else the last bytes begin a character still to come
            print(text[len(shown):], end="", flush=True)
            shown = text

    model.generate(x, c.max_new_tokens, c.temperature, c.top_k, c.top_p, tok.stop_ids, on_token)
    print(tok.decode(ids)[len(shown):], flush=True)
    return times


def print_samples(model, tok, x, c):
    """num_samples continuations of x (1, T) as one batch, printed when all are done."""
    start = time.perf_counter()
    batch = x.expand(c.num_samples, -1)
    out = model.generate(batch, c.max_new_tokens, c.temperature, c.top_k, c.top_p, tok.stop_ids)
    new = 0
    for i, ids in enumerate(out[:, x.shape[1]:].tolist()):
        if i:
            print("---------------")
        end = next((j for j, t in enumerate(ids) if t in tok.stop_ids), len(ids))
        new += min(end + 1, len(ids))
        print(tok.decode(ids[:end]), flush=True)
    seconds = time.perf_counter() - start
    print(f"[{c.num_samples} samples of {x.shape[1]} prompt tokens in one batch: {new} new tokens "
          f"in {seconds:.2f}s, {new / seconds:.1f} tokens/s]", file=sys.stderr)


def main(argv):
    c = configure(Config(), argv)
    model, tok = load_checkpoint(c.ckpt, dtype=getattr(torch, c.dtype), device=c.device)
    ids = prompt_ids(tok, read_prompt(c.prompt), chat=use_chat(tok, c.chat))
    if c.max_new_tokens < 1 or len(ids) >= model.cfg.max_seq_len:
        raise ValueError(f"no room to generate: max_new_tokens={c.max_new_tokens}, a prompt of "
                         f"{len(ids)} tokens, max_seq_len {model.cfg.max_seq_len}")
    model.eval()
    x = torch.tensor([ids], device=c.device)
    torch.manual_seed(c.seed)
    if c.num_samples > 1:
        print_samples(model, tok, x, c)
        return
    start = time.perf_counter()
    times = stream(model, tok, x, c)
    rate = ""  # tokens/s from the second token on: the first one pays for the prompt
    if len(times) > 2:
        rate = f", then {(len(times) - 2) / (times[-1] - times[1]):.1f} tokens/s"
    print(f"[{len(ids)} prompt tokens, first new token after {times[0] - start:.2f}s{rate}, "
          f"{len(times)} new tokens]", file=sys.stderr)


if __name__ == "__main__":
    run_program(main)
