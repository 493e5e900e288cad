"""A tiny random-weight Llama in the Hugging Face layout, for tests (milliseconds to write and load).

:func:`write_tiny_model` trains a byte-level BPE on a small built-in corpus
with ``tokenizers`` and writes::

    config.json             LlamaForCausalLM, with a top-level rope_theta
    model.safetensors       random weights (seeded), fp32 or fp16
    tokenizer.json          byte-level BPE; <|endoftext|>, <|im_start|>, <|im_end|> = 0, 1, 2
    tokenizer_config.json   ChatML chat template (SmolLM2's shape), eos <|im_end|>
    generation_config.json

The weights are random, so the text is gibberish, but every path (loader,
tokenizer, chat template, forward pass, sampling, stop handling) is the real
one.  Other packages' tests use it too.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

__all__ = ["CHATML_TEMPLATE", "write_tiny_gguf", "write_tiny_model"]

CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a tiny test model.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_CORPUS = """\
The capital of France is Paris. The capital of Italy is Rome. The capital of Spain is Madrid.
What is the capital of France? Paris is the capital and largest city of France.
Tokens are pieces of words; a worker sells tokens and a client pays for every token it receives.
The quick brown fox jumps over the lazy dog. Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 2024.
Un café crème, s'il vous plaît. Größe, naïve, façade, déjà vu. Привет, мир! 你好, 世界.  こんにちは 🙂🚀
def add(a, b):\n    return a + b\nprint(add(2, 3))\n
Hello! How are you today? I am fine, thank you. Good morning, good evening, good night.
"""


def _train_tokenizer(vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = _CORPUS.splitlines() * 4
    tok.train_from_iterator(lines, trainer)
    return tok


def write_tiny_model(
    directory: str | Path,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int | None = None,
    intermediate_size: int = 128,
    max_position: int = 512,
    vocab_size: int = 400,
    rope_theta: float = 10000.0,
    dtype: torch.dtype = torch.float32,
    tie_word_embeddings: bool = False,
    pad_vocab: bool = False,
) -> Path:
    """Write a tiny Llama model directory and return its path.

    The BPE learns at most a few hundred tokens from the built-in corpus; with
    ``pad_vocab`` the vocabulary is filled up to ``vocab_size`` with plain added
    tokens ``<|fN|>`` (a real model's embedding and head sizes, e.g. 49152 or
    128256, for benchmarks; every id still decodes to text).
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tok = _train_tokenizer(vocab_size)
    if pad_vocab and tok.get_vocab_size(with_added_tokens=True) < vocab_size:
        from tokenizers import AddedToken

        n = vocab_size - tok.get_vocab_size(with_added_tokens=True)
        tok.add_tokens([AddedToken(f"<|f{i}|>", special=False, normalized=False) for i in range(n)])
    tok.save(str(out / "tokenizer.json"))
    vocab = tok.get_vocab_size(with_added_tokens=True)
    hd = head_dim or hidden_size // num_heads
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.02 * 4).to(dtype)

    def ones(n: int) -> torch.Tensor:
        return (1.0 + 0.1 * torch.randn(n, generator=g)).to(dtype)

    tensors: dict[str, torch.Tensor] = {"model.embed_tokens.weight": rnd(vocab, hidden_size)}
    for i in range(num_layers):
        p = f"model.layers.{i}."
        tensors[p + "self_attn.q_proj.weight"] = rnd(num_heads * hd, hidden_size)
        tensors[p + "self_attn.k_proj.weight"] = rnd(num_kv_heads * hd, hidden_size)
        tensors[p + "self_attn.v_proj.weight"] = rnd(num_kv_heads * hd, hidden_size)
        tensors[p + "self_attn.o_proj.weight"] = rnd(hidden_size, num_heads * hd)
        tensors[p + "mlp.gate_proj.weight"] = rnd(intermediate_size, hidden_size)
        tensors[p + "mlp.up_proj.weight"] = rnd(intermediate_size, hidden_size)
        tensors[p + "mlp.down_proj.weight"] = rnd(hidden_size, intermediate_size)
        tensors[p + "input_layernorm.weight"] = ones(hidden_size)
        tensors[p + "post_attention_layernorm.weight"] = ones(hidden_size)
    tensors["model.norm.weight"] = ones(hidden_size)
    if not tie_word_embeddings:
        tensors["lm_head.weight"] = rnd(vocab, hidden_size)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": hd,
        "hidden_act": "silu",
        "max_position_embeddings": max_position,
        "rms_norm_eps": 1e-5,
        "rope_theta": rope_theta,  # top-level: exllamav2 reads only this key
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": tie_word_embeddings,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float16" if dtype == torch.float16 else "float32",
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    tok_config = {
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|im_end|>",
        "add_bos_token": False,
        "model_max_length": max_position,
        "chat_template": CHATML_TEMPLATE,
        "tokenizer_class": "GPT2Tokenizer",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    return out


def write_tiny_gguf(hf_dir: str | Path, path: str | Path, *, qtype: str = "F32") -> Path:
    """Convert a tiny HF directory (from :func:`write_tiny_model`) into a GGUF file.

    2-D weights are stored as ``qtype`` (F32, F16, Q8_0, Q4_0, Q4_1), norms as
    F32; q/k rows are permuted to the interleaved RoPE order, as llama.cpp's
    converter does; the tokenizer and chat template go into the metadata.
    """
    import gguf
    import numpy as np
    from safetensors.torch import load_file

    src = Path(hf_dir)
    cfg = json.loads((src / "config.json").read_text())
    tcfg = json.loads((src / "tokenizer_config.json").read_text())
    tok_json = json.loads((src / "tokenizer.json").read_text())
    sd = load_file(str(src / "model.safetensors"))
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    qt = gguf.GGMLQuantizationType[qtype]
    out = Path(path)
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_name("tiny")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(cfg["head_dim"])
    w.add_rope_freq_base(float(cfg["rope_theta"]))
    w.add_layer_norm_rms_eps(float(cfg["rms_norm_eps"]))
    w.add_vocab_size(cfg["vocab_size"])
    vocab = tok_json["model"]["vocab"]
    for added in tok_json.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    specials = {a["id"] for a in tok_json.get("added_tokens", []) if a.get("special")}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok_json["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if i in specials else 1 for i in range(len(tokens))])
    w.add_token_merges(merges)
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    w.add_add_bos_token(False)
    w.add_chat_template(tcfg["chat_template"])

    def permute(t: torch.Tensor, n: int) -> torch.Tensor:
        rows, cols = t.shape
        return t.reshape(n, 2, rows // n // 2, cols).transpose(1, 2).reshape(rows, cols)

    def put(name: str, t: torch.Tensor, quantize: bool) -> None:
        arr = t.float().numpy()
        if not quantize or qt == gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float32))
        elif qt == gguf.GGMLQuantizationType.F16:
            w.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(arr, qt), raw_dtype=qt)

    put("token_embd.weight", sd["model.embed_tokens.weight"], True)
    put("output_norm.weight", sd["model.norm.weight"], False)
    if "lm_head.weight" in sd:
        put("output.weight", sd["lm_head.weight"], True)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        put(f"blk.{i}.attn_q.weight", permute(sd[p + "self_attn.q_proj.weight"], heads), True)
        put(f"blk.{i}.attn_k.weight", permute(sd[p + "self_attn.k_proj.weight"], kv_heads), True)
        put(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"], True)
        put(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"], True)
        put(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"], True)
        put(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"], True)
        put(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"], True)
        put(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"], False)
        put(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"], False)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out
