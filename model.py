"""Ids to logits: a LLaMA-family decoder, sampling with a KV cache, and LoRA.

Read top to bottom: the config, the layers (RMSNorm, RoPE with Llama 3 scaling, grouped-query attention with
Mistral's sliding window and Qwen2's q/k/v biases, SwiGLU), the Transformer with generate(), LoRA. Module names
are those of Hugging Face's LlamaForCausalLM, so its state dict maps onto ours key for key; the file formats
(safetensors, Hugging Face and Meta layouts) are support/checkpoint.py's, its one import from this project.
"""
import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from support.checkpoint import read_checkpoint, write_checkpoint

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

    def forward(self, idx, start_pos=0, targets=None):
        """idx (B, T) token ids -> logits (B, T, vocab). start_pos: position of idx[:, 0] (KV-cache decoding).
        targets (B, T), -100 off the trained positions: log p(target) (n,) at the trained positions instead,
        in row-major order. The lm_head and log-softmax run LOGIT_CHUNK positions at a time, each block
        recomputed in backward, so the (n, vocab) float32 logits never exist at once (forward or backward)."""
        T = idx.shape[1]
        if start_pos + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start_pos + T} tokens exceeds max_seq_len {self.cfg.max_seq_len}")
        pos = torch.arange(start_pos, start_pos + T, device=idx.device)
        # (T, head_dim) in fp32 in any model dtype
        freqs = torch.outer(pos.float(), self.inv_freq).repeat(1, 2)
        cos = freqs.cos()
        sin = freqs.sin()
        # the keys each query sees: its past, within the sliding window; None where plain causal attention does it
        window = self.cfg.sliding_window or start_pos + T
        mask = None
        if (T > 1 and start_pos > 0) or start_pos + T > window:
            keys = torch.arange(start_pos + T, device=idx.device)
            mask = (keys <= pos[:, None]) & (keys > pos[:, None] - window)
        x = self.model.embed_tokens(idx)
        for layer in self.model.layers:
            args = (x, cos, sin, start_pos, mask)
            x = checkpoint(layer, *args, use_reentrant=False) if self.grad_ckpt else layer(*args)
        if targets is None:
            return self.lm_head(self.model.norm(x))
        trained = targets != -100
        h = self.model.norm(x[trained])  # prompt and padding positions never reach the lm_head
        logps = [checkpoint(self._token_logp, h_part, t_part, use_reentrant=False)
                 for h_part, t_part in zip(h.split(LOGIT_CHUNK), targets[trained].split(LOGIT_CHUNK))]
        return torch.cat(logps)

    def _token_logp(self, h, targets):
        return -F.cross_entropy(self.lm_head(h).float(), targets, reduction="none")

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
        fields, tensors = read_checkpoint(path)
        cfg = ModelConfig(**fields)
        with torch.device("meta"):  # no memory and no random init for weights that are loaded next
            model = cls(cfg)
        expected = {k: v.shape for k, v in model.state_dict().items()}
        if cfg.tie_embeddings:
            expected.pop("lm_head.weight")
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
        # one tensor at a time to the target dtype; the loaders drop the mapped pages behind us
        sd = {name: load(dtype or torch.float32, device) for name, (_, load, _) in tensors.items()}
        if cfg.tie_embeddings:
            sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
        model.load_state_dict(sd, strict=True, assign=True)
        if cfg.tie_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        model.inv_freq = rope_frequencies(cfg).to(device)
        return model

    def save_pretrained(self, directory, state_dict=None):
        """config.json + model.safetensors in Hugging Face's layout, LoRA adapters merged in. state_dict: the
        weights to write instead of the module's own, e.g. gathered from FSDP's shards."""
        sd = merged_state_dict(self) if state_dict is None else dict(state_dict)
        if self.cfg.tie_embeddings:
            del sd["lm_head.weight"]
        write_checkpoint(directory, asdict(self.cfg), sd)


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
