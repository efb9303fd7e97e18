"""The programs' settings: each declares them as a dataclass of defaults; configure() applies JSON
config files and --key=value flags, then checks every value against RULES before any file or
checkpoint is read. run_program() turns a user's mistake into one line and exit status 2.
"""
import ast
import json
import math
import re
import sys
from dataclasses import fields, replace
from pathlib import Path

import torch

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DTYPES = ("float32", "bfloat16", "float16")


def _device(v):
    if not re.fullmatch(r"cuda(:\d+)?", v):
        return v == "cpu"
    return int(v[5:] or 0) < torch.cuda.device_count()


RULES = {
    "lam": (lambda v: 1 <= v < math.inf, ">= 1 (U: the tokens whose probability rises lam-fold)"),
    "val_frac": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "out_dir": (lambda v: v.strip() != "", "a directory"),
    "ckpt": (lambda v: v.strip() != "", "a directory"),
    "lora_targets": (lambda v: set(v.split(",")) <= set(LORA_TARGETS),
                     f"names from {','.join(LORA_TARGETS)}"),
    # a message that depends on the machine is written when it is needed
    "device": (_device, lambda: f"cpu, or cuda or cuda:N on a GPU torch sees "
                                f"({torch.cuda.device_count()} here)"),
    "dtype": (lambda v: v in DTYPES, " | ".join(DTYPES)),
    "chat": (lambda v: v in ("auto", "yes", "no"), "auto | yes | no"),
}
POSITIVE = ("max_iters", "batch_size", "gradient_accumulation_steps", "eval_interval",
            "log_interval", "task_size", "n_layers", "n_heads", "dim", "max_len", "learning_rate",
            "base_lr", "lora_alpha", "num_samples", "n_eval", "beta")
NON_NEGATIVE = ("warmup_iters", "base_iters", "min_lr", "weight_decay", "grad_clip", "lora_rank",
                "alpha", "gamma", "temperature", "top_k", "max_new_tokens", "n_alpaca")
# NaN and inf (1e999, or NaN and Infinity in a JSON file) fail these too
RULES.update({key: (lambda v: 0 < v < math.inf, "> 0") for key in POSITIVE})
RULES.update({key: (lambda v: 0 <= v < math.inf, ">= 0") for key in NON_NEGATIVE})


def run_program(main):
    """A program's entry point: a bad setting, file or record is one line and exit status 2."""
    try:
        main(sys.argv[1:])
    except (ValueError, OSError, FloatingPointError) as e:
        print(f"{Path(sys.argv[0]).name}: {e}", file=sys.stderr)
        sys.exit(2)


def _flag_value(key, text, known):
    """The value of --key=text: a str default takes the text as it is (--out_dir=123 names the
    directory '123'); any other is a Python literal, true/false, or else a bare word, a string."""
    if isinstance(known.get(key), str):
        return text
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return {"true": True, "false": False}.get(text.lower(), text)


def configure(defaults, argv, choices=None):
    """A copy of the dataclass `defaults` with argv applied: JSON config files and --key=value
    flags, in order. A value takes the type of its default (an int is accepted for a float) and must
    pass RULES; choices {key: allowed values} adds the program's own lists (loss or eval modes)."""
    known = {f.name: getattr(defaults, f.name) for f in fields(defaults)}
    changes = {}
    for arg in argv:
        if arg.startswith("--"):
            key, eq, text = arg[2:].partition("=")
            if not eq:
                raise ValueError(f"argument {arg!r}: expected --key=value")
            items = [(key, _flag_value(key, text, known))]
        else:
            try:
                items = json.loads(Path(arg).read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise ValueError(f"config file {arg}: {e}") from None
            if not isinstance(items, dict):
                raise ValueError(f"config file {arg}: expected a JSON object of settings, "
                                 f"got {type(items).__name__}")
            items = items.items()
        for key, value in items:
            if key not in known:
                raise ValueError(f"unknown config key {key!r} (from {arg}); "
                                 f"known keys: {', '.join(known)}")
            if isinstance(known[key], float) and type(value) is int:
                value = float(value)
            if type(value) is not type(known[key]):
                raise ValueError(f"config key {key!r} (from {arg}): "
                                 f"expected {type(known[key]).__name__}, got {value!r}")
            changes[key] = value
    cfg = replace(defaults, **changes)
    rules = dict(RULES)
    for key, allowed in (choices or {}).items():
        rules[key] = (lambda v, allowed=allowed: v in allowed, " | ".join(allowed))
    for key, (ok, allowed) in rules.items():
        if key in known and not ok(getattr(cfg, key)):
            if callable(allowed):
                allowed = allowed()
            raise ValueError(f"config key {key!r}: expected {allowed}, got {getattr(cfg, key)!r}")
    return cfg
