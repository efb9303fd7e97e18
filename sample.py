"""Quick checks: continue a prompt with a checkpoint, streaming the text as the tokens come.

    python sample.py --ckpt=out --prompt="What is the capital of France?" --temperature=0
    echo "Name three primes." | python sample.py --ckpt=/path/to/hf_or_meta_dir run.json --top_p=0.9

ckpt: a Hugging Face or Meta directory, or train.py's out_dir (config, weights and tokenizer files side by side).
The prompt is wrapped in the model's chat format (chat='auto': when the checkpoint ships a chat template) or in
method.md's PLAIN template. --compile=True torch.compiles the model: the prompt and the first decode step wait for
the compilation (the tokens/s printed leaves both out). The text goes to stdout, the timing to stderr.
"""
import os
import sys
import time
from pathlib import Path

# before torch loads OpenMP: its spinning threads made small CPU ops up to 20x slower on 2 cores (measured)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

from data import Tokenizer, configure, prompt_ids, use_chat
from model import Transformer

# defaults; a JSON config file and --key=value flags override them (nanoGPT style)
DEFAULTS = dict(
    ckpt="out",               # a Hugging Face or Meta directory, or train.py's out_dir
    prompt="",                # the instruction; 'FILE:path' reads a file, '' or '-' reads stdin
    chat="auto",              # 'yes': the model's chat format, 'no': method.md's PLAIN, 'auto': 'yes' for chat models
    num_samples=1,
    max_new_tokens=256,
    temperature=0.8,          # 0: greedy
    top_k=0,                  # 0: off
    top_p=1.0,                # 1.0: off
    seed=1337,
    device="cuda" if torch.cuda.is_available() else "cpu",
    dtype="bfloat16" if torch.cuda.is_available() else "float32",
    compile=False,
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def read_prompt(prompt):
    if prompt.startswith("FILE:"):
        path = Path(prompt.removeprefix("FILE:"))
        if not path.is_file():
            raise FileNotFoundError(f"prompt file {path}: no such file")
        return path.read_text().strip()
    return sys.stdin.read().strip() if prompt in ("", "-") else prompt


def stream(model, tok, x, c):
    """Generate after x (1, T), printing the new text as it comes; returns the times at which each token arrived."""
    ids, times, shown = [], [], ""

    def on_token(nxt):
        nonlocal shown
        times.append(time.perf_counter())
        if nxt.item() in tok.stop_ids:
            return
        ids.append(nxt.item())
        text = tok.decode(ids)
        if not text.endswith("\ufffd"):  # else the last bytes start a character whose other bytes are still to come
            print(text[len(shown):], end="", flush=True)
            shown = text

    model.generate(x, c["max_new_tokens"], c["temperature"], c["top_k"], c["top_p"], tok.stop_ids, on_token)
    print(tok.decode(ids)[len(shown):], flush=True)
    return times


def run(c):
    if c["dtype"] not in DTYPES:
        raise ValueError(f"config key 'dtype': expected one of {', '.join(DTYPES)}, got {c['dtype']!r}")
    if not Path(c["ckpt"]).is_dir():
        raise FileNotFoundError(f"ckpt {c['ckpt']}: no such directory")
    tok = Tokenizer.from_pretrained(c["ckpt"])
    chat = use_chat(tok, c["chat"])
    ids = prompt_ids(tok, read_prompt(c["prompt"]), chat=chat)
    model = Transformer.from_pretrained(c["ckpt"], dtype=DTYPES[c["dtype"]], device=c["device"]).eval()
    if c["max_new_tokens"] < 1 or len(ids) >= model.cfg.max_seq_len:
        raise ValueError(f"no room to generate: max_new_tokens={c['max_new_tokens']}, a prompt of {len(ids)} tokens, "
                         f"max_seq_len {model.cfg.max_seq_len}")
    if c["compile"]:
        model.compile()  # compiles __call__, which generate() goes through
    x = torch.tensor([ids], device=c["device"])
    torch.manual_seed(c["seed"])
    for i in range(c["num_samples"]):
        if i:
            print("---------------")
        start = time.perf_counter()
        times = stream(model, tok, x, c)
        # tokens/s from the second token on: the first pays for the prompt, the second for compiling a decode step
        rate = f", then {(len(times) - 2) / (times[-1] - times[1]):.1f} tokens/s" if len(times) > 2 else ""
        print(f"[{len(ids)} prompt tokens, first new token after {times[0] - start:.2f}s{rate}, "
              f"{len(times)} new tokens]", file=sys.stderr)


def main(argv):
    try:
        run(configure(DEFAULTS, argv))
    except (ValueError, FileNotFoundError) as e:
        print(f"sample.py: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main(sys.argv[1:])
