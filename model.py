"""Ids to logits: a LLaMA-family decoder, its loaders and writer, sampling with a KV cache, and LoRA.

Read top to bottom: the config, the layers (RMSNorm, RoPE with Llama 3 scaling, grouped-query attention with
Mistral's sliding window and Qwen2's q/k/v biases, SwiGLU), the Transformer with generate(), readers for Hugging Face
(safetensors) and Meta (consolidated.NN.pth) checkpoints, a safetensors writer, LoRA. Module names are those of
Hugging Face's LlamaForCausalLM, so its state dict maps onto ours key for key. It imports no other project file.
"""
import json
import math
import mmap
import os
import pickle
import shutil
import struct
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

LOGIT_CHUNK = 1024  # trained positions per lm_head + log-softmax block: (1024, vocab) float32 logits at a time


@dataclass
class ModelConfig:
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 4
    vocab_size: int = 260
    hidden_dim: int = 384          # SwiGLU inner size
    head_dim: int = 0              # 0: dim // n_heads
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict = field(default_factory=dict)  # Llama 3.1 "llama3" scaling; {} = none
    tie_embeddings: bool = False
    max_seq_len: int = 2048
    qkv_bias: bool = False         # Qwen2's biases on the q, k and v projections
    sliding_window: int = 0        # Mistral: a token attends to at most this many (itself included); 0 = all

    def __post_init__(self):
        self.head_dim = self.head_dim or self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")


# ----------------------------------------------------------------------------- layers

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalize in fp32, scale in the input dtype: Hugging Face's order, so bf16 results agree
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def rope_frequencies(cfg):
    """Inverse frequencies (head_dim/2,) in fp32, with Llama 3.1's "llama3" long-context scaling if configured."""
    # on the CPU even while the model is built on the meta device: a meta tensor would have to be recomputed anyway
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, device="cpu").float() / cfg.head_dim)
    s = cfg.rope_scaling
    if not s:
        return inv_freq
    old_len = s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / s["low_freq_factor"], old_len / s["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    # long wavelengths are divided by factor, short ones kept, the band between interpolated smoothly
    smooth = (old_len / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
    mid = torch.where(wavelen < high_wavelen, inv_freq, (1 - smooth) * inv_freq / s["factor"] + smooth * inv_freq)
    return torch.where(wavelen > low_wavelen, inv_freq / s["factor"], mid)


def apply_rope(x, cos, sin):
    # Hugging Face's "rotate half" layout (first half / second half of each head); the fp32 tables promote the products
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat((-x2, x1), dim=-1) * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.cache = None  # (k, v) tensors of (B, n_kv_heads, max_len, head_dim) while generating

    def forward(self, x, cos, sin, start_pos, mask):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.cache is not None:
            ck, cv = self.cache
            ck[:, :, start_pos:start_pos + T], cv[:, :, start_pos:start_pos + T] = k, v
            k, v = ck[:, :, :start_pos + T], cv[:, :, :start_pos + T]
        causal = mask is None and start_pos == 0  # else no mask means one new token that sees the whole cache
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.down_proj = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, start_pos, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, start_pos, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


# ----------------------------------------------------------------------------- the model

class Transformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(cfg.vocab_size, cfg.dim, _weight=torch.empty(cfg.vocab_size, cfg.dim)),
            layers=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers)), norm=RMSNorm(cfg.dim, cfg.norm_eps)))
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_frequencies(cfg), persistent=False)
        self.grad_ckpt = False  # True: keep each block's input only and recompute the rest in backward (train.py)
        if self.lm_head.weight.is_meta:  # built to be loaded: random init on meta costs time and memory (torch._dynamo)
            return
        for m in self.modules():  # GPT-2's init: N(0, 0.02), then a smaller std for the residual projections
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layers))

    def forward(self, idx, start_pos=0, keep=None, targets=None):
        """idx (B, T) token ids -> logits (B, T, vocab). start_pos: position of idx[:, 0] (KV-cache decoding).
        keep (B, T) bool: logits only where a loss needs them, (n, vocab) in row-major order; training skips the
        lm_head and its (B, T, vocab) output for prompt and padding tokens. targets (B, T), -100 off the trained
        positions: log p(target) (n,) there instead, LOGIT_CHUNK positions at a time, each block recomputed in
        backward, so the (n, vocab) float32 logits never exist at once (forward or backward)."""
        T = idx.shape[1]
        if start_pos + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start_pos + T} tokens exceeds max_seq_len {self.cfg.max_seq_len}")
        pos = torch.arange(start_pos, start_pos + T, device=idx.device)
        freqs = torch.outer(pos.float(), self.inv_freq).repeat(1, 2)  # (T, head_dim) in fp32 in any model dtype
        cos, sin = freqs.cos(), freqs.sin()
        # the keys each query sees: its past, within the sliding window; None where plain causal attention does it
        mask, window = None, self.cfg.sliding_window or start_pos + T
        if T > 1 and start_pos > 0 or start_pos + T > window:
            keys = torch.arange(start_pos + T, device=idx.device)
            mask = (keys <= pos[:, None]) & (keys > pos[:, None] - window)
        x = self.model.embed_tokens(idx)
        for layer in self.model.layers:
            args = (x, cos, sin, start_pos, mask)
            x = checkpoint(layer, *args, use_reentrant=False) if self.grad_ckpt else layer(*args)
        keep = keep if targets is None else targets != -100
        x = self.model.norm(x if keep is None else x[keep])
        if targets is None:
            return self.lm_head(x)
        logp = lambda h, t: -F.cross_entropy(self.lm_head(h).float(), t, reduction="none")
        return torch.cat([checkpoint(logp, h, t, use_reentrant=False)
                          for h, t in zip(x.split(LOGIT_CHUNK), targets[keep].split(LOGIT_CHUNK))])

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, stop_ids=None, on_token=None):
        """Continue idx (B, T) by up to max_new_tokens; a row stops at any stop id (then it is padded with it).
        temperature=0 is greedy. on_token(next_ids) is called with each new (B,) column, for streaming."""
        B, T = idx.shape
        max_len = min(T + max_new_tokens, self.cfg.max_seq_len)
        shape = (B, self.cfg.n_kv_heads, max_len, self.cfg.head_dim)
        for layer in self.model.layers:  # (k, v) in the weights' dtype and device
            layer.self_attn.cache = (self.lm_head.weight.new_zeros(shape), self.lm_head.weight.new_zeros(shape))
        stop = torch.tensor(stop_ids or [], dtype=torch.long, device=idx.device)
        done = torch.zeros(B, dtype=torch.bool, device=idx.device)
        out, start_pos, x = idx, 0, idx
        try:
            while out.shape[1] < max_len and not done.all():
                logits = self(x, start_pos)[:, -1].float()
                start_pos += x.shape[1]
                nxt = sample_next(logits, temperature, top_k, top_p)
                nxt = torch.where(done, out[:, -1], nxt)  # finished rows repeat their stop id
                done |= torch.isin(nxt, stop)
                out, x = torch.cat([out, nxt[:, None]], dim=1), nxt[:, None]
                if on_token:
                    on_token(nxt)
        finally:
            for layer in self.model.layers:
                layer.self_attn.cache = None
        return out

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None):
        """Load a Hugging Face (config.json + safetensors) or Meta (params.json + consolidated.NN.pth) directory."""
        path = Path(path)
        finish_checkpoint(path)
        if (path / "config.json").exists():
            cfg, state = _read_hf(path)
        elif (path / "params.json").exists():
            cfg, state = _read_meta(path)
        else:
            raise FileNotFoundError(f"{path}: no config.json (Hugging Face layout) or params.json (Meta layout)")
        dtype = dtype or torch.float32
        with torch.device("meta"):
            model = cls(cfg)
        expected = {k: v.shape for k, v in model.state_dict().items()}
        if cfg.tie_embeddings:
            expected.pop("lm_head.weight")
        for name, (shape, _, file) in state.items():
            if name not in expected:
                raise ValueError(f"{file}: unexpected tensor {name!r}")
            if tuple(shape) != tuple(expected[name]):
                raise ValueError(f"{file}: tensor {name!r} has shape {tuple(shape)}, the config says "
                                 f"{tuple(expected[name])}")
        missing = sorted(set(expected) - set(state))
        if missing:
            raise ValueError(f"{path}: missing tensor(s) {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        # one tensor at a time to the target dtype; the loaders drop the mapped pages behind us
        sd = {name: load(dtype, device) for name, (_, load, _) in state.items()}
        if cfg.tie_embeddings:
            sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
        model.load_state_dict(sd, strict=True, assign=True)
        if cfg.tie_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        model.inv_freq = rope_frequencies(cfg).to(device)
        return model

    def save_pretrained(self, directory, state_dict=None):
        """Write config.json + model.safetensors in Hugging Face's layout (LoRA adapters merged in); state_dict: the
        weights to write instead of the module's own, e.g. gathered from FSDP's shards."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        cfg = self.cfg
        sd = merged_state_dict(self) if state_dict is None else dict(state_dict)
        if cfg.tie_embeddings:
            del sd["lm_head.weight"]
        family = "qwen2" if cfg.qkv_bias else "mistral" if cfg.sliding_window else "llama"
        hf = dict(architectures=[f"{family.capitalize()}ForCausalLM"], model_type=family, hidden_size=cfg.dim,
                  num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
                  vocab_size=cfg.vocab_size, intermediate_size=cfg.hidden_dim, head_dim=cfg.head_dim,
                  rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings,
                  max_position_embeddings=cfg.max_seq_len, hidden_act="silu", sliding_window=cfg.sliding_window or None,
                  torch_dtype=str(next(iter(sd.values())).dtype).removeprefix("torch."))
        if cfg.rope_scaling:
            hf["rope_scaling"] = dict(cfg.rope_scaling, rope_type="llama3")
        (directory / "config.json").write_text(json.dumps(hf, indent=2))
        write_safetensors(directory / "model.safetensors", sd)


def sample_next(logits, temperature, top_k, top_p):
    """(B, vocab) fp32 logits -> (B,) ids: greedy at temperature 0, else top-k / nucleus sampling."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1)[:, 0]


# ----------------------------------------------------------------------------- checkpoint files

SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def read_safetensors(file):
    """{name: (shape, loader, file)} of a memory-mapped safetensors file; loader(dtype, device) copies one tensor to
    the target dtype and drops its pages, so peak memory stays near one copy."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{file}: truncated safetensors file ({size} bytes)")
        n = struct.unpack("<Q", head)[0]
        if 8 + n > size:
            raise ValueError(f"{file}: safetensors header of {n} bytes runs past the end of the file ({size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{file}: unreadable safetensors header ({e})") from None
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # private mapping: writable for torch, file untouched
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info.get("dtype") not in SAFETENSORS_DTYPES:
            raise ValueError(f"{file}: tensor {name!r} has dtype {info.get('dtype')}; supported: F32, F16, BF16")
        src_dtype, shape = SAFETENSORS_DTYPES[info["dtype"]], info["shape"]
        begin, end = (8 + n + o for o in info["data_offsets"])
        if end > size or end - begin != math.prod(shape) * src_dtype.itemsize:
            raise ValueError(f"{file}: tensor {name!r} has data offsets past the end of the file or of the wrong size")

        def load(dtype, device, begin=begin, end=end, src_dtype=src_dtype, shape=shape):
            raw = torch.frombuffer(mm, dtype=torch.uint8, count=end - begin, offset=begin)
            t = raw.view(src_dtype).reshape(shape).to(device=device, dtype=dtype, copy=True)
            start = begin - begin % mmap.PAGESIZE
            mm.madvise(mmap.MADV_DONTNEED, start, end - start)
            return t
        out[name] = (tuple(shape), load, file)
    return out


def finish_checkpoint(path):
    """Move a complete save that was killed while moving its files (path/.ckpt-new/COMPLETE) into path. Two
    processes may do this at once: each file moves once. An incomplete .ckpt-new is the writer's to remove."""
    tmp = Path(path) / ".ckpt-new"
    with suppress(FileNotFoundError):
        if (tmp / "COMPLETE").exists():
            for f in sorted(tmp.iterdir()):
                if f.name != "COMPLETE":
                    with suppress(FileNotFoundError):
                        os.replace(f, Path(path) / f.name)
            shutil.rmtree(tmp, ignore_errors=True)


def write_safetensors(file, state_dict):
    """Write {name: tensor} as safetensors: 8-byte header length, JSON header, then the raw little-endian bytes."""
    header, offset, tensors = {"__metadata__": {"format": "pt"}}, 0, []
    inverse = {v: k for k, v in SAFETENSORS_DTYPES.items()}
    for name, t in state_dict.items():
        t = t.detach().contiguous().cpu()
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": inverse[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
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
    c = _read_json(path / "config.json", ["hidden_size", "num_hidden_layers", "num_attention_heads",
                                          "intermediate_size", "vocab_size", "rms_norm_eps"])
    family = c.get("model_type", "llama")
    odd = [k for k in ("attention_bias", "mlp_bias", "use_sliding_window") if c.get(k)]  # Qwen2's window: per layer
    if family not in ("llama", "mistral", "qwen2") or odd:
        raise ValueError(f"{path / 'config.json'}: model_type {' '.join([repr(family), *odd])} is not supported; "
                         "supported: llama, mistral (sliding_window), qwen2 (its q/k/v biases); no other biases")
    rope = c.get("rope_parameters") or dict(c.get("rope_scaling") or {}, rope_theta=c.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise ValueError(f"{path / 'config.json'}: rope type {rope_type!r} is not supported (default, llama3)")
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    scaling = {k: rope[k] for k in keys} if rope_type == "llama3" else {}
    cfg = ModelConfig(dim=c["hidden_size"], n_layers=c["num_hidden_layers"], n_heads=c["num_attention_heads"],
                      n_kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"], vocab_size=c["vocab_size"],
                      hidden_dim=c["intermediate_size"], head_dim=c.get("head_dim") or 0, norm_eps=c["rms_norm_eps"],
                      rope_theta=rope.get("rope_theta", 10000.0), rope_scaling=scaling,
                      tie_embeddings=c.get("tie_word_embeddings", False),
                      max_seq_len=c.get("max_position_embeddings", 2048), qkv_bias=family == "qwen2",
                      sliding_window=(c.get("sliding_window") or 0) if family == "mistral" else 0)
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
    # older checkpoints store the derived rotary inverse frequencies; they are recomputed from the config
    return cfg, {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}


def _read_meta(path):
    p = _read_json(path / "params.json", ["dim", "n_layers", "n_heads", "vocab_size"])
    files = sorted(path.glob("consolidated.*.pth"))
    if not files:
        raise FileNotFoundError(f"{path}: params.json but no consolidated.NN.pth")
    try:
        shards = [torch.load(f, map_location="cpu", weights_only=True, mmap=True) for f in files]
    except (pickle.UnpicklingError, RuntimeError) as e:
        raise ValueError(f"{path}: a consolidated.NN.pth that is not plain tensors (pickled code or objects are "
                         f"never run: weights_only loading) or not a torch file: {str(e).splitlines()[0]}") from None
    hidden = int(2 * 4 * p["dim"] / 3)  # Meta's rule for the SwiGLU inner size
    if p.get("ffn_dim_multiplier"):
        hidden = int(p["ffn_dim_multiplier"] * hidden)
    multiple = p.get("multiple_of", 256)
    hidden = multiple * ((hidden + multiple - 1) // multiple)
    scaling = dict(factor=p.get("rope_scaling_factor", 8.0), low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=8192) if p.get("use_scaled_rope") else {}
    vocab = p["vocab_size"] if p["vocab_size"] > 0 else shards[0]["tok_embeddings.weight"].shape[0]  # Llama 2: -1
    cfg = ModelConfig(dim=p["dim"], n_layers=p["n_layers"], n_heads=p["n_heads"],
                      n_kv_heads=p.get("n_kv_heads") or p["n_heads"], vocab_size=vocab, hidden_dim=hidden,
                      norm_eps=p.get("norm_eps", 1e-5), rope_theta=p.get("rope_theta", 10000.0), rope_scaling=scaling,
                      max_seq_len=p.get("max_seq_len", 8192))
    names = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
    meta_to_hf = dict(zip(
        "attention.wq attention.wk attention.wv attention.wo feed_forward.w1 feed_forward.w2 feed_forward.w3 "
        "attention_norm ffn_norm".split(), "self_attn.q_proj self_attn.k_proj self_attn.v_proj self_attn.o_proj "
        "mlp.gate_proj mlp.down_proj mlp.up_proj input_layernorm post_attention_layernorm".split()))
    names |= {f"layers.{i}.{a}.weight": f"model.layers.{i}.{b}.weight" for i in range(cfg.n_layers)
              for a, b in meta_to_hf.items()}
    state = {}
    for key in shards[0]:
        if key.endswith("rope.freqs"):
            continue  # derived buffer in some releases
        if key not in names:
            raise ValueError(f"{files[0]}: unexpected tensor {key!r}")
        parts = [s[key] for s in shards]
        state[names[key]] = (*_meta_loader(parts, names[key], cfg), files[0])
    return cfg, state


def _meta_loader(parts, name, cfg):
    """(shape, loader) of one tensor joined from Meta's model-parallel shards."""
    if len(parts) == 1 or parts[0].dim() == 1:  # norms are replicated across shards
        dim, shape = None, parts[0].shape
    else:  # column-parallel shards (wq, wk, wv, w1, w3, output, vocab embedding) join on dim 0, row-parallel on dim 1
        vocab_whole = name == "model.embed_tokens.weight" and parts[0].shape[0] == cfg.vocab_size
        dim = 1 if name.endswith(("o_proj.weight", "down_proj.weight")) or vocab_whole else 0
        shape = list(parts[0].shape)
        shape[dim] = sum(p.shape[dim] for p in parts)

    def load(dtype, device):
        t = (parts[0] if dim is None else torch.cat(parts, dim=dim)).to(device=device, dtype=dtype)
        # Meta interleaves rotary pairs (x0, x1), Hugging Face splits heads in halves: permute q and k rows
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            n = cfg.n_heads if "q_proj" in name else cfg.n_kv_heads
            t = t.view(n, cfg.head_dim // 2, 2, cfg.dim).transpose(1, 2).reshape(n * cfg.head_dim, cfg.dim)
        return t
    return tuple(shape), load


# ----------------------------------------------------------------------------- LoRA

class LoRALinear(nn.Linear):
    """A frozen linear layer plus a trainable low-rank update: y = x W^T + scale * x A^T B^T (B starts at zero)."""

    def __init__(self, base, rank, scale):
        super().__init__(base.in_features, base.out_features, bias=False, device="meta")
        self.weight, self.bias = base.weight, base.bias  # a bias (Qwen2's q, k, v) stays frozen as it is
        self.weight.requires_grad_(False)
        self.scale = scale
        self.lora_A = nn.Parameter(base.weight.new_empty(rank, base.in_features))  # the base's dtype and device
        self.lora_B = nn.Parameter(base.weight.new_zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # the init of nn.Linear and of peft

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale


def add_lora(model, rank, alpha, targets=("gate_proj", "up_proj", "down_proj")):
    """Freeze the model and wrap the target projections with LoRA adapters (scale = alpha / rank)."""
    model.requires_grad_(False)
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if name in targets:
                    setattr(parent, name, LoRALinear(child, rank, alpha / rank))
    return model


def merged_state_dict(model):
    """The model's state dict with every LoRA update folded into its weight: W + scale * B @ A."""
    sd = {k: v for k, v in model.state_dict().items() if ".lora_" not in k}
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            sd[f"{name}.weight"] = (m.weight + m.scale * m.lora_B @ m.lora_A).detach()
    return sd
