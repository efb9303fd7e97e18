"""Checkpoint files for model.py: Hugging Face (config.json + safetensors, sharded or not) and Meta
(params.json + consolidated.NN.pth) readers, a safetensors reader and writer, and the finish of an
interrupted save. A config travels as a dict of model.ModelConfig's fields: no import of model.py.
"""
import json
import math
import mmap
import os
import pickle
import shutil
import struct
from contextlib import suppress
from pathlib import Path

import torch

SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def read_checkpoint(path):
    """(config fields, {tensor name: (shape, load(dtype, device), file)}) of a checkpoint dir."""
    path = Path(path)
    finish_checkpoint(path)
    if (path / "config.json").exists():
        return _read_hf(path)
    if (path / "params.json").exists():
        return _read_meta(path)
    raise FileNotFoundError(f"{path}: no config.json (Hugging Face) or params.json (Meta layout)")


def check_tensors(path, tensors, expected):
    """The tensors read are exactly the model's, {name: shape} in expected, each of its shape."""
    for name, (shape, _, file) in tensors.items():
        if name not in expected:
            raise ValueError(f"{file}: unexpected tensor {name!r}")
        if tuple(shape) != tuple(expected[name]):
            raise ValueError(f"{file}: tensor {name!r} has shape {tuple(shape)}, the config says "
                             f"{tuple(expected[name])}")
    missing = sorted(set(expected) - set(tensors))
    if missing:
        more = " ..." if len(missing) > 5 else ""
        raise ValueError(f"{path}: missing tensor(s) {', '.join(missing[:5])}{more}")


def write_checkpoint(directory, cfg, state_dict):
    """config.json + model.safetensors in Hugging Face's layout; cfg holds ModelConfig's fields."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    family = "mistral" if cfg["sliding_window"] else "llama"
    if cfg["qkv_bias"]:
        family = "qwen2"
    hf = dict(
        architectures=[f"{family.capitalize()}ForCausalLM"], model_type=family,
        hidden_size=cfg["dim"], num_hidden_layers=cfg["n_layers"],
        num_attention_heads=cfg["n_heads"], num_key_value_heads=cfg["n_kv_heads"],
        vocab_size=cfg["vocab_size"], intermediate_size=cfg["hidden_dim"], head_dim=cfg["head_dim"],
        rms_norm_eps=cfg["norm_eps"], rope_theta=cfg["rope_theta"],
        tie_word_embeddings=cfg["tie_embeddings"], max_position_embeddings=cfg["max_seq_len"],
        hidden_act="silu", sliding_window=cfg["sliding_window"] or None,
        torch_dtype=str(next(iter(state_dict.values())).dtype).removeprefix("torch."))
    if cfg["rope_scaling"]:
        hf["rope_scaling"] = dict(cfg["rope_scaling"], rope_type="llama3")
    (directory / "config.json").write_text(json.dumps(hf, indent=2))
    write_safetensors(directory / "model.safetensors", state_dict)


def read_safetensors(file):
    """{name: (shape, loader, file)} of a memory-mapped safetensors file; loader(dtype, device)
    copies one tensor to the target dtype and drops its pages: peak memory stays near one copy."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{file}: truncated safetensors file ({size} bytes)")
        n = struct.unpack("<Q", head)[0]
        if 8 + n > size:
            raise ValueError(f"{file}: safetensors header of {n} bytes runs past the end of the "
                             f"file ({size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{file}: unreadable safetensors header ({e})") from None
        # a private mapping: writable for torch, the file untouched
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info.get("dtype") not in SAFETENSORS_DTYPES:
            raise ValueError(f"{file}: tensor {name!r} has dtype {info.get('dtype')}; "
                             "supported: F32, F16, BF16")
        src_dtype = SAFETENSORS_DTYPES[info["dtype"]]
        shape = info["shape"]
        begin, end = (8 + n + o for o in info["data_offsets"])
        if end > size or end - begin != math.prod(shape) * src_dtype.itemsize:
            raise ValueError(f"{file}: tensor {name!r} has data offsets past the end of the file "
                             "or of the wrong size")

        def load(dtype, device, begin=begin, end=end, src_dtype=src_dtype, shape=shape, name=name):
            raw = torch.frombuffer(mm, dtype=torch.uint8, count=end - begin, offset=begin)
            t = raw.view(src_dtype).reshape(shape).to(device=device, dtype=dtype, copy=True)
            if not t.isfinite().all():  # a diverged run's weights
                raise ValueError(f"{file}: tensor {name!r} holds NaN or inf")
            start = begin - begin % mmap.PAGESIZE
            mm.madvise(mmap.MADV_DONTNEED, start, end - start)
            return t
        out[name] = (tuple(shape), load, file)
    return out


def finish_checkpoint(path):
    """Move a save killed while moving its files, if complete (path/.ckpt-new/COMPLETE), into path.
    Two processes may do so at once: each file moves once. Its writer removes an incomplete one."""
    tmp = Path(path) / ".ckpt-new"
    with suppress(FileNotFoundError):
        if (tmp / "COMPLETE").exists():
            for f in sorted(tmp.iterdir()):
                if f.name != "COMPLETE":
                    with suppress(FileNotFoundError):
                        os.replace(f, Path(path) / f.name)
            shutil.rmtree(tmp, ignore_errors=True)


def write_safetensors(file, state_dict):
    """{name: tensor} as safetensors: the header's length (8 bytes), JSON header, raw bytes."""
    header = {"__metadata__": {"format": "pt"}}
    offset = 0
    tensors = []
    inverse = {v: k for k, v in SAFETENSORS_DTYPES.items()}
    for name, t in state_dict.items():
        t = t.detach().contiguous().cpu()
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": inverse[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + nbytes]}
        tensors.append(t)
        offset += nbytes
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)  # the format aligns the data section to 8 bytes
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for t in tensors:
            f.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def _read_json(file, keys):
    try:
        cfg = json.loads(file.read_text(encoding="utf-8"))
    except ValueError as e:  # bad JSON or not UTF-8
        raise ValueError(f"{file}: not a valid JSON file ({e})") from None
    missing = [k for k in keys if k not in cfg]
    if missing:
        raise ValueError(f"{file}: missing key(s) {', '.join(missing)}")
    return cfg


def _read_hf(path):
    file = path / "config.json"
    c = _read_json(file, ["hidden_size", "num_hidden_layers", "num_attention_heads",
                          "intermediate_size", "vocab_size", "rms_norm_eps"])
    family = c.get("model_type", "llama")
    odd = [k for k in ("attention_bias", "mlp_bias", "use_sliding_window") if c.get(k)]
    if family not in ("llama", "mistral", "qwen2") or odd:  # Qwen2's sliding window is per layer
        raise ValueError(f"{file}: model_type {' '.join([repr(family), *odd])} is not supported; "
                         "supported: llama, mistral (sliding_window), qwen2 (q/k/v biases alone)")
    # transformers' newer name; older files keep rope_theta beside rope_scaling
    rope = c.get("rope_parameters")
    if not rope:
        rope = dict(c.get("rope_scaling") or {}, rope_theta=c.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise ValueError(f"{file}: rope type {rope_type!r} is not supported (default, llama3)")
    scaling = {}
    if rope_type == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        scaling = {k: rope[k] for k in keys}
    window = (c.get("sliding_window") or 0) if family == "mistral" else 0
    cfg = dict(dim=c["hidden_size"], n_layers=c["num_hidden_layers"],
               n_heads=c["num_attention_heads"],
               n_kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"],
               vocab_size=c["vocab_size"], hidden_dim=c["intermediate_size"],
               head_dim=c.get("head_dim") or 0, norm_eps=c["rms_norm_eps"],
               rope_theta=rope.get("rope_theta", 10000.0), rope_scaling=scaling,
               tie_embeddings=c.get("tie_word_embeddings", False),
               max_seq_len=c.get("max_position_embeddings", 2048), qkv_bias=family == "qwen2",
               sliding_window=window)
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")
    state = {}
    for name in files:
        state.update(read_safetensors(path / name))
    # older checkpoints store the derived rotary inverse frequencies: recomputed from the config
    return cfg, {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}


META_TO_HF = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
              "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
              "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
              "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm",
              "ffn_norm": "post_attention_layernorm"}


def _read_meta(path):
    p = _read_json(path / "params.json", ["dim", "n_layers", "n_heads", "vocab_size"])
    files = sorted(path.glob("consolidated.*.pth"))
    if not files:
        raise FileNotFoundError(f"{path}: params.json but no consolidated.NN.pth")
    try:
        shards = [torch.load(f, map_location="cpu", weights_only=True, mmap=True) for f in files]
    except (pickle.UnpicklingError, RuntimeError) as e:
        raise ValueError(f"{path}: a consolidated.NN.pth that is not plain tensors (pickled code "
                         "or objects are never run: weights_only loading) or not a torch file: "
                         f"{str(e).splitlines()[0]}") from None
    hidden = int(2 * 4 * p["dim"] / 3)  # Meta's rule for the SwiGLU inner size
    if p.get("ffn_dim_multiplier"):
        hidden = int(p["ffn_dim_multiplier"] * hidden)
    multiple = p.get("multiple_of", 256)
    hidden = multiple * ((hidden + multiple - 1) // multiple)
    scaling = {}
    if p.get("use_scaled_rope"):
        scaling = dict(factor=p.get("rope_scaling_factor", 8.0), low_freq_factor=1.0,
                       high_freq_factor=4.0, original_max_position_embeddings=8192)
    vocab = p["vocab_size"]
    if vocab <= 0:  # Llama 2 writes -1
        vocab = shards[0]["tok_embeddings.weight"].shape[0]
    cfg = dict(dim=p["dim"], n_layers=p["n_layers"], n_heads=p["n_heads"],
               n_kv_heads=p.get("n_kv_heads") or p["n_heads"], vocab_size=vocab, hidden_dim=hidden,
               norm_eps=p.get("norm_eps", 1e-5), rope_theta=p.get("rope_theta", 10000.0),
               rope_scaling=scaling, max_seq_len=p.get("max_seq_len", 8192))
    names = {"tok_embeddings.weight": "model.embed_tokens.weight",
             "norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
    for i in range(cfg["n_layers"]):
        for meta, hf in META_TO_HF.items():
            names[f"layers.{i}.{meta}.weight"] = f"model.layers.{i}.{hf}.weight"
    state = {}
    for key in shards[0]:
        if key.endswith("rope.freqs"):
            continue  # derived buffer in some releases
        if key not in names:
            raise ValueError(f"{files[0]}: unexpected tensor {key!r}")
        state[names[key]] = (*_meta_loader([s[key] for s in shards], names[key], cfg), files[0])
    return cfg, state


def _meta_loader(parts, name, cfg):
    """(shape, loader) of one tensor joined from Meta's model-parallel shards."""
    dim = None
    shape = parts[0].shape
    if len(parts) > 1 and parts[0].dim() > 1:  # norms are replicated across shards
        # column-parallel shards (wq, wk, wv, w1, w3, output, vocab embedding) join on dim 0,
        # row-parallel ones (wo, w2, and an embedding split by its width) on dim 1
        dim = 0
        vocab_whole = name == "model.embed_tokens.weight" and shape[0] == cfg["vocab_size"]
        if name.endswith(("o_proj.weight", "down_proj.weight")) or vocab_whole:
            dim = 1
        shape = list(shape)
        shape[dim] = sum(p.shape[dim] for p in parts)

    def load(dtype, device):
        t = parts[0] if dim is None else torch.cat(parts, dim=dim)
        t = t.to(device=device, dtype=dtype)
        # Meta interleaves rotary pairs, Hugging Face splits heads in halves: permute q and k rows
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            n = cfg["n_heads"] if "q_proj" in name else cfg["n_kv_heads"]
            head_dim = cfg["dim"] // cfg["n_heads"]
            t = t.view(n, head_dim // 2, 2, cfg["dim"]).transpose(1, 2)
            t = t.reshape(n * head_dim, cfg["dim"])
        return t
    return tuple(shape), load
