"""Ids to logits: a LLaMA-family decoder, batched sampling with a KV cache, and LoRA.

Module names are Hugging Face's LlamaForCausalLM's, so its state dict maps onto ours key for key;
the file formats are support/checkpoint.py's, the one project file this one imports.
"""
import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from support.checkpoint import check_tensors, read_checkpoint, write_checkpoint

LOGIT_CHUNK = 1024  # trained positions per lm_head + log-softmax block: (1024, vocab) fp32


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
    sliding_window: int = 0        # Mistral: a token sees at most this many (itself too); 0: all

    def __post_init__(self):
        self.head_dim = self.head_dim or self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads "
                             f"({self.n_kv_heads})")


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalize in fp32, scale in the input dtype: Hugging Face's order, so bf16 results agree
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def rope_frequencies(cfg):
    """Inverse frequencies (head_dim/2,) in fp32, with Llama 3.1's "llama3" long-context scaling."""
    # on the CPU even while the model is built on the meta device: a meta tensor would be recomputed
    exponents = torch.arange(0, cfg.head_dim, 2, device="cpu").float() / cfg.head_dim
    inv_freq = 1.0 / cfg.rope_theta ** exponents
    s = cfg.rope_scaling
    if not s:
        return inv_freq
    old_len = s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / s["low_freq_factor"], old_len / s["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    # long wavelengths are divided by factor, short ones kept, the band between interpolated
    low = s["low_freq_factor"]
    smooth = (old_len / wavelen - low) / (s["high_freq_factor"] - low)
    between = (1 - smooth) * inv_freq / s["factor"] + smooth * inv_freq
    mid = torch.where(wavelen < high_wavelen, inv_freq, between)
    return torch.where(wavelen > low_wavelen, inv_freq / s["factor"], mid)


def apply_rope(x, cos, sin):
    # Hugging Face's "rotate half" layout (halves of each head); fp32 tables promote the products
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat((-x2, x1), dim=-1) * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads
        self.head_dim = cfg.head_dim
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
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        if self.cache is not None:
            cache_k, cache_v = self.cache
            cache_k[:, :, start_pos:start_pos + T] = k
            cache_v[:, :, start_pos:start_pos + T] = v
            k = cache_k[:, :, :start_pos + T]
            v = cache_v[:, :, :start_pos + T]
        # a decode step (T = 1) sees the whole cache; `True if`: a plain bool even for a symbolic T
        causal = True if mask is None and T > 1 else False
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           enable_gqa=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class LMHead(nn.Linear):
    """The output projection in fp32 under autocast: bf16 logits put ~6% errors in p_x and p_n."""

    def forward(self, h, targets=None):
        """h (n, dim) -> fp32 logits (n, vocab); with targets (n,): log p(target), 0 at -100."""
        with torch.autocast(h.device.type, enabled=False):
            logits = F.linear(h.float(), self.weight.float())
        if targets is None:
            return logits
        return -F.cross_entropy(logits, targets, reduction="none")  # ignore_index: -100


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


class Transformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        embed = nn.Embedding(cfg.vocab_size, cfg.dim, _weight=torch.empty(cfg.vocab_size, cfg.dim))
        layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.model = nn.ModuleDict(dict(embed_tokens=embed, layers=layers, norm=norm))
        self.lm_head = LMHead(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_frequencies(cfg), persistent=False)
        self.grad_ckpt = False  # True: keep each block's input only, recompute the rest in backward
        if self.lm_head.weight.is_meta:  # built to be loaded: no random init
            return
        for m in self.modules():  # GPT-2's init: N(0, 0.02), a smaller std on the residual outputs
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layers))

    def forward(self, idx, positions=None, targets=None):
        """idx (B, T) token ids -> fp32 logits (B, T, vocab). With positions and targets (B, N):
        log p(targets[b, n]) predicted at position positions[b, n] of row b, (B, N), 0 where a
        target is -100. Only those positions reach the lm_head, LOGIT_CHUNK at a time, each block
        recomputed in backward: the (B * N, vocab) fp32 logits never exist at once."""
        h = self.hidden(idx)
        if targets is None:
            return self.lm_head(self.model.norm(h))
        # a gather by integer positions: no device sync (a boolean mask would need one)
        h = self.model.norm(torch.take_along_dim(h, positions[..., None], dim=1)).flatten(0, 1)
        blocks = zip(h.split(LOGIT_CHUNK), targets.flatten().split(LOGIT_CHUNK))
        logps = [checkpoint(self.lm_head, h, t, use_reentrant=False) for h, t in blocks]
        return torch.cat(logps).view(targets.shape)

    def compile_pieces(self):
        """torch.compile each block (one graph for every layer) and the lm_head, not the loops."""
        for layer in self.model.layers:
            layer.compile(dynamic=True)
        self.lm_head.compile(dynamic=True)

    def hidden(self, idx, start_pos=0, pad=None):
        """The last block's output (B, T, dim), before the final norm. start_pos: the cache
        position of idx[:, 0]; pad (B,): each row's left padding, which no token attends to."""
        T = idx.shape[1]
        if start_pos + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start_pos + T} tokens exceeds max_seq_len "
                             f"{self.cfg.max_seq_len}")
        pos = torch.arange(start_pos, start_pos + T, device=idx.device)  # in the cache
        rope_pos = pos.float()
        if pad is not None:  # a row's positions start after its padding: (B, 1, T) for the heads
            rope_pos = (pos[None, None] - pad[:, None, None]).clamp(min=0).float()
        freqs = rope_pos[..., None] * self.inv_freq
        freqs = torch.cat([freqs, freqs], dim=-1)  # (..., T, head_dim) in fp32 in any model dtype
        cos = freqs.cos()
        sin = freqs.sin()
        mask = self.attention_mask(start_pos, T, pad, idx.device)
        x = self.model.embed_tokens(idx)
        for layer in self.model.layers:
            if self.grad_ckpt:
                x = checkpoint(layer, x, cos, sin, start_pos, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, start_pos, mask)
        return x

    def attention_mask(self, start_pos, T, pad, device):
        """The keys each query at cache positions start_pos.. sees: its past, within the sliding
        window, after its row's padding. None where plain causal attention does it."""
        end = start_pos + T
        window = self.cfg.sliding_window or end
        if pad is None and end <= window and (start_pos == 0 or T == 1):
            return None
        pos = torch.arange(start_pos, end, device=device)
        keys = torch.arange(end, device=device)
        mask = (keys <= pos[:, None]) & (keys > pos[:, None] - window)
        if pad is None:
            return mask
        # (B, 1, T, keys); a padding query sees itself alone, so that no row of the softmax is empty
        mask = (mask & (keys >= pad[:, None, None])) | (keys == pos[:, None])
        return mask[:, None]

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, stop_ids=None,
                 on_token=None, pad=None):
        """Continue idx (B, T), left-padded by pad (B,) tokens (left_pad), by up to max_new_tokens;
        a row stops at any stop id and its later columns repeat it.
        temperature=0 is greedy. on_token(ids) gets each new (B,) column, for streaming."""
        B, T = idx.shape
        max_len = min(T + max_new_tokens, self.cfg.max_seq_len)
        if T >= max_len:
            return idx
        if pad is not None and not pad.any():
            pad = None  # equal lengths: plain causal attention
        shape = (B, self.cfg.n_kv_heads, max_len, self.cfg.head_dim)
        weight = self.lm_head.weight  # (k, v) in the weights' dtype and device
        for layer in self.model.layers:
            layer.self_attn.cache = (weight.new_zeros(shape), weight.new_zeros(shape))
        stop = torch.tensor(stop_ids or [], dtype=torch.long, device=idx.device)
        out = torch.cat([idx, idx.new_zeros(B, max_len - T)], dim=1)
        done = torch.zeros(B, dtype=torch.bool, device=idx.device)
        x = idx
        start_pos = 0  # the cache position of x[:, 0]; the last token sampled: out[:, start_pos]
        try:
            while start_pos + x.shape[1] < max_len:
                h = self.hidden(x, start_pos, pad)[:, -1]  # the lm_head only where we sample
                nxt = sample_next(self.lm_head(self.model.norm(h)), temperature, top_k, top_p)
                start_pos += x.shape[1]
                # a finished row stays in the batch (no cache copies) and repeats its stop id
                nxt = torch.where(done, out[:, start_pos - 1], nxt)
                out[:, start_pos] = nxt
                done |= torch.isin(nxt, stop)
                if on_token:
                    on_token(nxt)
                if done.all():  # the one device sync of a token
                    break
                x = nxt[:, None]
        finally:
            for layer in self.model.layers:
                layer.self_attn.cache = None
        return out[:, :start_pos + 1]

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None):
        """A Hugging Face (config.json, safetensors) or Meta (params.json, .pth) directory."""
        fields, tensors = read_checkpoint(path)
        cfg = ModelConfig(**fields)
        with torch.device("meta"):  # no memory and no random init for weights that are loaded next
            model = cls(cfg)
        expected = {k: v.shape for k, v in model.state_dict().items()}
        if cfg.tie_embeddings:
            expected.pop("lm_head.weight")
        check_tensors(path, tensors, expected)
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
        """config.json + model.safetensors in Hugging Face's layout, LoRA adapters merged in.
        state_dict: the weights to write instead of the module's own, e.g. gathered by FSDP."""
        sd = merged_state_dict(self) if state_dict is None else dict(state_dict)
        if self.cfg.tie_embeddings:
            del sd["lm_head.weight"]
        write_checkpoint(directory, asdict(self.cfg), sd)


def sample_next(logits, temperature, top_k, top_p):
    """(B, vocab) fp32 logits -> (B,) ids: greedy at temperature 0, else top-k, nucleus sampling."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the least prefix with mass >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    # a draw by exponential races (gpt-fast's): exact as multinomial, without its device sync
    races = torch.empty_like(logits).exponential_(1).clamp(min=1e-30)  # a 0 would pick p = 0
    return (logits.softmax(-1) / races).argmax(-1)


def left_pad(prompts, device=None):
    """Prompts of any lengths as generate's input: left-padded ids (B, T) and the padding (B,)."""
    T = max(len(p) for p in prompts)
    idx = torch.zeros(len(prompts), T, dtype=torch.long)
    for r, p in enumerate(prompts):
        idx[r, T - len(p):] = torch.tensor(p, dtype=torch.long)
    pad = torch.tensor([T - len(p) for p in prompts])
    return idx.to(device), pad.to(device)


class LoRALinear(nn.Linear):
    """A frozen linear layer plus a trainable low-rank update: y = x W^T + scale x A^T B^T."""

    def __init__(self, base, rank, scale):
        super().__init__(base.in_features, base.out_features, bias=False, device="meta")
        self.weight = base.weight
        self.bias = base.bias  # a bias (Qwen2's q, k, v) stays frozen as it is
        self.weight.requires_grad_(False)
        self.scale = scale
        # the base's dtype and device
        self.lora_A = nn.Parameter(base.weight.new_empty(rank, base.in_features))
        self.lora_B = nn.Parameter(base.weight.new_zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # the init of nn.Linear and of peft
        self.enabled = True

    def forward(self, x):
        if not self.enabled:
            return F.linear(x, self.weight, self.bias)
        update = F.linear(F.linear(x, self.lora_A), self.lora_B)
        return F.linear(x, self.weight, self.bias) + update * self.scale


def add_lora(model, rank, alpha, targets=("gate_proj", "up_proj", "down_proj")):
    """Freeze the model and wrap the target projections in LoRA adapters (scale = alpha / rank)."""
    model.requires_grad_(False)
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if name in targets:
                    setattr(parent, name, LoRALinear(child, rank, alpha / rank))
    return model


@contextmanager
def lora_disabled(model):
    """The model without its LoRA updates while the block runs: DPO's reference, no second copy."""
    adapters = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for m in adapters:
        m.enabled = False
    try:
        yield model
    finally:
        for m in adapters:
            m.enabled = True


def merged_state_dict(model):
    """The model's state dict with every LoRA update folded into its weight: W + scale * B @ A,
    one tensor at a time on the CPU (no GPU memory), in fp32, then in the base's dtype."""
    sd = {k: v for k, v in model.state_dict().items() if ".lora_" not in k}
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            update = m.lora_B.detach().cpu().float() @ m.lora_A.detach().cpu().float()
            merged = m.weight.detach().cpu().float() + m.scale * update
            sd[f"{name}.weight"] = merged.to(m.weight.dtype)
    return sd
