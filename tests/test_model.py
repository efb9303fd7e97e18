"""model.py against transformers' LlamaForCausalLM: logits, loaders, writer, generate, LoRA, bad
input."""
import json
import struct

import pytest
import torch
import transformers

from model import ModelConfig, Transformer, add_lora, left_pad, merged_state_dict, LoRALinear

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=96, vocab_size=101, rms_norm_eps=1e-5, max_position_embeddings=256,
            rope_theta=10000.0, tie_word_embeddings=False)
LLAMA3_SCALING = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=32)


def hf_model(seed=0, family="Llama", **overrides):
    torch.manual_seed(seed)
    # HF edits dicts in place
    overrides = {k: dict(v) if isinstance(v, dict) else v for k, v in overrides.items()}
    cfg = getattr(transformers, f"{family}Config")(**{**TINY, **overrides})
    m = getattr(transformers, f"{family}ForCausalLM")(cfg).eval()
    # HF initialises norms to 1 and biases to 0; random values make the test able to fail on them
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
            elif n.endswith("bias"):
                p.normal_(std=0.5)
    return m


def hf_logits(m, idx):
    with torch.no_grad():
        return m(idx).logits.float()


def ids(T=40, B=2, vocab=101, seed=1):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("overrides", [
    dict(),                                           # grouped-query attention, untied
    dict(tie_word_embeddings=True, num_key_value_heads=4),
    dict(rope_scaling=LLAMA3_SCALING, rope_theta=500000.0),
    dict(num_key_value_heads=1, head_dim=32),          # multi-query, head_dim != dim / heads
], ids=["gqa", "tied", "llama3-rope", "mqa-headdim"])
def test_logits_match_transformers(tmp_path, overrides):
    ref = hf_model(**overrides)
    ref.save_pretrained(tmp_path)
    ours = Transformer.from_pretrained(tmp_path)
    x = ids(T=120)
    torch.testing.assert_close(ours(x), hf_logits(ref, x), rtol=0, atol=1e-4)


@pytest.mark.parametrize("family, overrides", [
    # Llama 2: no grouped-query attention, no rope scaling
    ("Llama", dict(num_key_value_heads=4)),
    # grouped-query attention, a window shorter than the sequences
    ("Mistral", dict(sliding_window=16)),
    ("Qwen2", dict(rope_theta=1e6)),                    # q/k/v biases, untied
    ("Qwen2", dict(tie_word_embeddings=True, num_key_value_heads=1)),
], ids=["llama2", "mistral", "qwen2", "qwen2-tied"])
def test_family_logits_generate_and_save_match_transformers(tmp_path, family, overrides):
    ref = hf_model(family=family, **overrides)
    ref.save_pretrained(tmp_path / "hf")
    ours = Transformer.from_pretrained(tmp_path / "hf")
    x = ids(T=40)
    torch.testing.assert_close(ours(x), hf_logits(ref, x), atol=1e-4, rtol=0)
    prompt = ids(T=7, B=1)  # with the KV cache, 37 tokens: past Mistral's window
    expected = ref.generate(prompt, max_new_tokens=30, do_sample=False, min_new_tokens=30,
                            pad_token_id=0)
    assert torch.equal(ours.generate(prompt, 30, temperature=0), expected)
    assert_batched_generate_matches(ours, ref)
    add_lora(ours, 4, 8.0, ("q_proj", "v_proj", "up_proj"))  # B = 0: the same model, biases kept
    torch.testing.assert_close(ours(x), hf_logits(ref, x), atol=1e-4, rtol=0)
    ours.save_pretrained(tmp_path / "ours")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert (type(back) is type(ref)
            and back.config.tie_word_embeddings == ref.config.tie_word_embeddings)
    torch.testing.assert_close(hf_logits(back, x), hf_logits(ref, x), atol=1e-4, rtol=0)


def test_sharded_and_bf16_files(tmp_path):
    ref = hf_model().to(torch.bfloat16)
    ref.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ref32 = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ours = Transformer.from_pretrained(tmp_path, dtype=torch.float32)
    x = ids()
    torch.testing.assert_close(ours(x), hf_logits(ref32, x), rtol=0, atol=1e-4)
    assert (Transformer.from_pretrained(tmp_path, dtype=torch.bfloat16).lm_head.weight.dtype
            == torch.bfloat16)


def test_older_top_level_rope_keys(tmp_path):
    ref = hf_model(rope_scaling=LLAMA3_SCALING, rope_theta=500000.0)
    # transformers writes the newer rope_parameters; rewrite as Llama 3.1's config.json
    ref.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg.pop("rope_parameters")["rope_theta"] == 500000.0
    cfg |= dict(rope_theta=500000.0, rope_scaling=LLAMA3_SCALING)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    ours = Transformer.from_pretrained(tmp_path)
    x = ids()
    torch.testing.assert_close(ours(x), hf_logits(ref, x), rtol=0, atol=1e-4)


@pytest.mark.parametrize("n_kv_heads, vocab_size", [(2, 101), (None, -1)], ids=["llama3", "llama2"])
def test_meta_layout_two_shards(tmp_path, n_kv_heads, vocab_size):
    ref = hf_model(num_key_value_heads=n_kv_heads or 4)
    c = ref.config
    hd = c.hidden_size // c.num_attention_heads

    def unpermute(w, n):  # Hugging Face's halves layout back to Meta's interleaved pairs
        return w.view(n, 2, hd // 2, c.hidden_size).transpose(1, 2).reshape(n * hd, c.hidden_size)

    sd = ref.state_dict()
    meta = {"tok_embeddings.weight": sd["model.embed_tokens.weight"],
            "norm.weight": sd["model.norm.weight"],
            "output.weight": sd["lm_head.weight"]}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        meta |= {f"layers.{i}.attention.wq.weight": unpermute(sd[p + "self_attn.q_proj.weight"],
                                                              c.num_attention_heads),
                 f"layers.{i}.attention.wk.weight": unpermute(sd[p + "self_attn.k_proj.weight"],
                                                              c.num_key_value_heads),
                 f"layers.{i}.attention.wv.weight": sd[p + "self_attn.v_proj.weight"],
                 f"layers.{i}.attention.wo.weight": sd[p + "self_attn.o_proj.weight"],
                 f"layers.{i}.feed_forward.w1.weight": sd[p + "mlp.gate_proj.weight"],
                 f"layers.{i}.feed_forward.w2.weight": sd[p + "mlp.down_proj.weight"],
                 f"layers.{i}.feed_forward.w3.weight": sd[p + "mlp.up_proj.weight"],
                 f"layers.{i}.attention_norm.weight": sd[p + "input_layernorm.weight"],
                 f"layers.{i}.ffn_norm.weight": sd[p + "post_attention_layernorm.weight"]}
    # model parallelism: column-parallel weights split on dim 0, row-parallel (wo, w2) on dim 1,
    # norms replicated; Llama 2's embedding splits its dim 1, Llama 3's its vocabulary
    row_parallel = (("wo.weight", "w2.weight")
                    + (("tok_embeddings.weight",) if vocab_size < 0 else ()))
    for shard in range(2):
        part = {}
        for k, v in meta.items():
            dim = None if v.dim() == 1 else 1 if k.endswith(row_parallel) else 0
            part[k] = v.clone() if dim is None else v.chunk(2, dim=dim)[shard].clone()
        torch.save(part, tmp_path / f"consolidated.0{shard}.pth")
    # Meta's hidden size rule: 96 = multiple_of * ceil(int(2 * 4 * 64 / 3) * 0.5625 / multiple_of)
    # Llama 2's params.json has no n_kv_heads and vocab_size -1 (the tokenizer's size)
    params = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads, vocab_size=vocab_size,
                  multiple_of=32, ffn_dim_multiplier=0.5625, norm_eps=1e-5, rope_theta=10000.0)
    (tmp_path / "params.json").write_text(
        json.dumps({k: v for k, v in params.items() if v is not None}))
    ours = Transformer.from_pretrained(tmp_path)
    assert ((ours.cfg.hidden_dim, ours.cfg.vocab_size, ours.cfg.n_kv_heads)
            == (96, 101, n_kv_heads or 4))
    x = ids()
    torch.testing.assert_close(ours(x), hf_logits(ref, x), rtol=0, atol=1e-4)


def test_save_pretrained_read_by_transformers(tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=101, hidden_dim=96,
                      rope_scaling=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                        original_max_position_embeddings=32))
    ours = Transformer(cfg)
    ours.save_pretrained(tmp_path)
    ref = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    x = ids()
    torch.testing.assert_close(ours(x), hf_logits(ref, x), rtol=0, atol=1e-4)
    again = Transformer.from_pretrained(tmp_path)
    assert torch.equal(again(x), ours(x))


def assert_batched_generate_matches(ours, ref, n_new=24):
    """Prompts of very different lengths, left-padded into one batch: each row's greedy tokens equal
    its own generation alone, and transformers' generate on the same padded batch."""
    prompts = [ids(T=n, B=1, seed=n)[0].tolist() for n in (3, 25, 11)]
    x, pad = left_pad(prompts)
    batched = ours.generate(x, n_new, temperature=0, pad=pad)[:, x.shape[1]:]
    for row, p in zip(batched, prompts):
        assert torch.equal(row, ours.generate(torch.tensor([p]), n_new, temperature=0)[0, len(p):])
    mask = (torch.arange(x.shape[1]) >= pad[:, None]).long()
    # no end-of-sequence token: transformers would hold back id 2, the configs' default EOS
    theirs = ref.generate(x, attention_mask=mask, max_new_tokens=n_new, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    assert torch.equal(batched, theirs[:, x.shape[1]:])


def test_batched_generate_stops_rows_and_samples_reproducibly():
    """A row that stops leaves the batch; the others go on as they would alone. Seeded sampling is
    reproducible."""
    torch.manual_seed(0)
    m = Transformer(ModelConfig(dim=32, n_layers=2, n_heads=2, n_kv_heads=1, vocab_size=50,
                                hidden_dim=64))
    prompts = [ids(T=n, B=1, vocab=50, seed=n)[0].tolist() for n in (2, 9, 5, 14)]
    alone = [m.generate(torch.tensor([p]), 10, temperature=0)[0, len(p):] for p in prompts]
    # row 0 stops at its third new token, the others whenever they meet it
    stop = alone[0][2].item()
    x, pad = left_pad(prompts)
    out = m.generate(x, 10, temperature=0, stop_ids=[stop], pad=pad)[:, x.shape[1]:]
    for row, want in zip(out, alone):
        hits = (want == stop).nonzero()
        end = hits[0].item() + 1 if len(hits) else len(want)
        assert torch.equal(row[:end], want[:end]) and (row[end:] == stop).all()
    torch.manual_seed(3)
    first = m.generate(x, 10, temperature=1.0, top_k=20, pad=pad)
    torch.manual_seed(3)
    assert torch.equal(m.generate(x, 10, temperature=1.0, top_k=20, pad=pad), first)


def test_greedy_generate_matches_transformers():
    ref = hf_model()
    ours = Transformer(ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=101,
                                   hidden_dim=96, max_seq_len=256))
    ours.load_state_dict(ref.state_dict())
    x = ids(T=7, B=1)
    expected = ref.generate(x, max_new_tokens=30, do_sample=False, min_new_tokens=30,
                            pad_token_id=0)
    assert torch.equal(ours.generate(x, 30, temperature=0), expected)
    # batched with a KV cache equals the slow way: full forward, argmax, append
    xb = ids(T=5, B=3)
    slow = xb
    for _ in range(8):
        slow = torch.cat([slow, ours(slow)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(ours.generate(xb, 8, temperature=0), slow)


def test_generate_stops_and_sampling_options():
    torch.manual_seed(0)
    m = Transformer(ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=50,
                                hidden_dim=64))
    x = ids(T=4, B=2, vocab=50)
    greedy = m.generate(x, 12, temperature=0)
    assert torch.equal(m.generate(x, 12, temperature=1.0, top_k=1), greedy)
    assert torch.equal(m.generate(x, 12, temperature=1.0, top_p=1e-6), greedy)
    stop = greedy[0, 6].item()
    out = m.generate(x, 12, temperature=0, stop_ids=[stop])
    first = (out[0, 4:] == stop).nonzero()[0].item() + 4
    assert (out[0, first:] == stop).all()
    seen = []
    m.generate(x, 3, temperature=0, on_token=seen.append)
    assert torch.equal(torch.stack(seen, 1), greedy[:, 4:7])


def test_real_smollm2_logits_and_generate(smollm2_dir):
    ref = transformers.LlamaForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    ours = Transformer.from_pretrained(smollm2_dir)
    assert ours.cfg.tie_embeddings and ours.cfg.n_kv_heads == 3
    x = torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28,
                       7018, 411, 407]])
    torch.testing.assert_close(ours(x), hf_logits(ref, x), rtol=0, atol=1e-4)
    expected = ref.generate(x, max_new_tokens=16, do_sample=False, min_new_tokens=16)
    assert torch.equal(ours.generate(x, 16, temperature=0), expected)
    assert_batched_generate_matches(ours, ref, n_new=12)


def test_lora_trains_adapters_only_and_merges():
    torch.manual_seed(0)
    m = Transformer(ModelConfig(dim=32, n_layers=2, n_heads=2, n_kv_heads=1, vocab_size=50,
                                hidden_dim=64))
    base = {k: v.clone() for k, v in m.state_dict().items()}
    add_lora(m, rank=4, alpha=8)
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n and ".mlp." in n for n in trainable)
    x = ids(T=6, vocab=50)
    plain = Transformer(m.cfg)
    plain.load_state_dict(base)
    assert torch.equal(m(x), plain(x))  # B starts at zero: the adapted model starts as the base
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.normal_()
    merged = merged_state_dict(m)
    layer = m.model.layers[1].mlp.up_proj
    assert isinstance(layer, LoRALinear)
    want = base["model.layers.1.mlp.up_proj.weight"] + 2.0 * layer.lora_B @ layer.lora_A
    assert torch.allclose(merged["model.layers.1.mlp.up_proj.weight"], want)
    plain.load_state_dict(merged)
    torch.testing.assert_close(plain(x), m(x), rtol=0, atol=1e-5)


# ---------------------------------------------------------------- bad input, one clear message each

def saved_tiny(tmp_path):
    hf_model().save_pretrained(tmp_path)
    return tmp_path / "model.safetensors"


def test_truncated_safetensors(tmp_path):
    f = saved_tiny(tmp_path)
    f.write_bytes(f.read_bytes()[:5000])
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor .* past the end"):
        Transformer.from_pretrained(tmp_path)
    f.write_bytes(b"\x01\x02")
    with pytest.raises(ValueError, match="truncated safetensors"):
        Transformer.from_pretrained(tmp_path)


def test_header_past_end_of_file(tmp_path):
    f = saved_tiny(tmp_path)
    data = f.read_bytes()
    f.write_bytes(struct.pack("<Q", len(data) * 2) + data[8:])
    with pytest.raises(ValueError, match="header of .* runs past the end"):
        Transformer.from_pretrained(tmp_path)


def test_missing_config_key(tmp_path):
    saved_tiny(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg["hidden_size"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config\.json: missing key\(s\) hidden_size"):
        Transformer.from_pretrained(tmp_path)


def test_shape_mismatch_and_missing_tensor(tmp_path):
    saved_tiny(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(cfg, intermediate_size=80)))
    with pytest.raises(ValueError, match=(r"model\.safetensors: tensor "
                                          r"'model\.layers\.0\.mlp\.\w+_proj\.weight' has shape")):
        Transformer.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(dict(cfg, num_hidden_layers=3)))
    with pytest.raises(ValueError, match=r"missing tensor\(s\) model\.layers\.2\."):
        Transformer.from_pretrained(tmp_path)


@pytest.mark.parametrize("edit, message", [
    # same tensor names, other maths
    (dict(model_type="gemma"), "model_type 'gemma' is not supported"),
    # o_proj too
    (dict(attention_bias=True), "model_type 'llama' attention_bias is not supported"),
    (dict(model_type="qwen2", use_sliding_window=True),
     "model_type 'qwen2' use_sliding_window is not supported"),
])
def test_unsupported_families_fail_clearly(tmp_path, edit, message):
    saved_tiny(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(cfg, **edit)))
    with pytest.raises(ValueError,
                       match=rf"config\.json: {message}; supported: llama, mistral .*qwen2"):
        Transformer.from_pretrained(tmp_path)


def loss_and_grads(m, logp):
    """A weighted sum of the log-probs (weights that differ per position, so a misplaced value
    shows) and its grads."""
    loss = (logp.flatten() * torch.linspace(0.5, 1.5, logp.numel())).sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad(set_to_none=True)
    return loss.detach(), grads


def left_aligned(trained, targets):
    """(positions, targets), (B, N): each row's trained positions and their targets, then
    padding (-100), as data.collate lays them out."""
    N = int(trained.sum(1).max())
    positions = torch.zeros(len(trained), N, dtype=torch.long)
    out = torch.full((len(trained), N), -100)
    for r, row in enumerate(trained):
        where = row.nonzero()[:, 0]
        positions[r, :len(where)] = where
        out[r, :len(where)] = targets[r, where]
    return positions, out


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_chunked_target_logprobs_equal_the_full_log_softmax(monkeypatch, autocast):
    """model(idx, positions, targets) in blocks of 7 positions against log_softmax over the full
    (B, T, vocab) logits: the same values and gradients, 0 on padding, and the lm_head never sees
    more than 7 positions, forward or backward."""
    import model
    monkeypatch.setattr(model, "LOGIT_CHUNK", 7)
    torch.manual_seed(0)
    m = Transformer(ModelConfig(dim=32, n_layers=2, n_heads=2, n_kv_heads=1, vocab_size=50,
                                hidden_dim=64))
    x = ids(T=12, B=3, vocab=50)
    targets = torch.where(torch.rand(3, 12, generator=torch.Generator().manual_seed(3)) > 0.4,
                          ids(12, 3, 50, 4), -100)
    trained = targets != -100
    positions, wanted = left_aligned(trained, targets)
    assert positions.numel() == 21 and wanted.eq(-100).sum() == 5  # three blocks, padding too
    ctx = (torch.autocast("cpu", dtype=torch.bfloat16) if autocast
           else torch.autocast("cpu", enabled=False))
    with ctx:
        logits = m(x).float()
    want = logits.log_softmax(-1).gather(2, targets.clamp(min=0)[..., None])[..., 0]
    want = torch.zeros(3, 12).masked_scatter(trained, want[trained])
    want = want.gather(1, positions) * (wanted != -100)
    want_loss, want_grads = loss_and_grads(m, want)
    rows_seen = []
    m.lm_head.register_forward_pre_hook(lambda mod, inp: rows_seen.append(inp[0].shape[0]))
    with ctx:
        got = m(x, positions, wanted)
    got_loss, got_grads = loss_and_grads(m, got)
    # each block in forward, then again, last first, in backward
    assert rows_seen == [7, 7, 7] * 2
    torch.testing.assert_close(got, want.detach())
    torch.testing.assert_close(got_loss, want_loss)
    for k, want_grad in want_grads.items():
        rtol = 1.6e-2 if autocast else 1.3e-6  # bf16's resolution, or float32's default
        torch.testing.assert_close(got_grads[k], want_grad, rtol=rtol,
                                   atol=1e-5 + rtol * want_grad.abs().max().item())


def test_lm_head_and_log_softmax_stay_fp32_under_autocast():
    """Under bf16 autocast the blocks run in bf16 but the logits do not: log p(target) equals the
    fp32 projection of the final hidden state (bf16 logits would be off by more than 1e-2)."""
    torch.manual_seed(0)
    m = Transformer(ModelConfig(dim=64, n_layers=2, n_heads=2, n_kv_heads=1, vocab_size=300,
                                hidden_dim=128))
    torch.nn.init.normal_(m.lm_head.weight, std=0.5)  # logits of ~10, where bf16 rounds by ~0.05
    x, targets = ids(T=9, B=2, vocab=300), ids(T=9, B=2, vocab=300, seed=5)
    positions = torch.arange(9).expand(2, 9)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        h = m.model.norm(m.hidden(x))
        got = m(x, positions, targets)
        logits = m(x)
    assert logits.dtype == torch.float32
    want = (h.float() @ m.lm_head.weight.T).log_softmax(-1).gather(2, targets[..., None])[..., 0]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # what autocast alone would give: a bf16 matmul, bf16 logits
    rounded = (h.bfloat16() @ m.lm_head.weight.T.bfloat16()).float().log_softmax(-1)
    assert (rounded.gather(2, targets[..., None])[..., 0] - want).abs().max() > 1e-2


def test_grad_ckpt_recomputes_each_block_with_the_same_loss_and_gradients():
    torch.manual_seed(0)
    m = Transformer(ModelConfig(dim=32, n_layers=2, n_heads=2, n_kv_heads=1, vocab_size=50,
                                hidden_dim=64))
    x, targets = ids(T=10, B=2, vocab=50), ids(T=10, B=2, vocab=50, seed=5)
    positions = torch.arange(10).expand(2, 10)
    want = loss_and_grads(m, m(x, positions, targets))
    calls = []
    for block in m.model.layers:
        block.register_forward_pre_hook(lambda mod, inp: calls.append(1))
    m.grad_ckpt = True
    got = loss_and_grads(m, m(x, positions, targets))
    assert len(calls) == 4  # 2 blocks, each run in forward and again in backward
    torch.testing.assert_close(got[0], want[0])
    for k in want[1]:
        torch.testing.assert_close(got[1][k], want[1][k])


class Payload:
    def __reduce__(self):  # what a malicious .pth carries: code that runs when it is unpickled
        return (print, ("ran",))


def test_meta_file_with_pickled_code_is_refused_in_one_line(tmp_path, capsys):
    torch.save({"tok_embeddings.weight": Payload()}, tmp_path / "consolidated.00.pth")
    (tmp_path / "params.json").write_text(
        json.dumps({"dim": 8, "n_layers": 1, "n_heads": 2, "vocab_size": 16}))
    with pytest.raises(ValueError, match=(r"consolidated.NN.pth that is not plain tensors "
                                          r"\(pickled code or objects")):
        Transformer.from_pretrained(tmp_path)
    assert "ran" not in capsys.readouterr().out
