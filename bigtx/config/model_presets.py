"""Named model architectures (`model.preset`). Explicit `model.*` fields in a spec override them."""

from __future__ import annotations

_LLAMA = {"position": "rope", "norm": "rmsnorm", "norm_placement": "pre", "mlp": "swiglu", "bias": False}
# The GPT-2 recipe: learned positions, LayerNorm with bias, GELU MLP, multi-head, tied head.
_CLASSIC = {
    "position": "learned",
    "norm": "layernorm",
    "norm_placement": "pre",
    "mlp": "gelu",
    "bias": True,
    "tie_embeddings": True,
}

MODEL_PRESETS: dict[str, dict[str, object]] = {
    # debug model for tests: seconds per step on a CPU
    "tiny": {
        **_LLAMA,
        "vocab_size": 320,
        "d_model": 64,
        "n_layers": 2,
        "n_heads": 4,
        "n_kv_heads": 2,
        "d_ff": 176,
        "max_seq_len": 256,
    },
    # the CPU demo model (about 7M parameters with a 4096-token BPE vocabulary)
    "demo": {
        **_LLAMA,
        "vocab_size": 4096,
        "d_model": 256,
        "n_layers": 4,
        "n_heads": 8,
        "n_kv_heads": 4,
        "d_ff": 688,
        "max_seq_len": 512,
    },
    "llama-125m": {
        **_LLAMA,
        "vocab_size": 32000,
        "d_model": 768,
        "n_layers": 12,
        "n_heads": 12,
        "n_kv_heads": 4,
        "d_ff": 2048,
        "max_seq_len": 2048,
    },
    "llama-1.3b": {
        **_LLAMA,
        "vocab_size": 32000,
        "d_model": 2048,
        "n_layers": 24,
        "n_heads": 16,
        "n_kv_heads": 16,
        "d_ff": 5632,
        "max_seq_len": 2048,
    },
    # exactly Llama-2-7B: 6,738,415,616 parameters
    "llama-7b": {
        **_LLAMA,
        "vocab_size": 32000,
        "d_model": 4096,
        "n_layers": 32,
        "n_heads": 32,
        "n_kv_heads": 32,
        "d_ff": 11008,
        "max_seq_len": 4096,
    },
    # exactly Llama-2-13B: 13,015,864,320 parameters
    "llama-13b": {
        **_LLAMA,
        "vocab_size": 32000,
        "d_model": 5120,
        "n_layers": 40,
        "n_heads": 40,
        "n_kv_heads": 40,
        "d_ff": 13824,
        "max_seq_len": 4096,
    },
    # exactly Llama-2-70B (grouped-query attention, 8 KV heads): 68,976,648,192 parameters
    "llama-70b": {
        **_LLAMA,
        "vocab_size": 32000,
        "d_model": 8192,
        "n_layers": 80,
        "n_heads": 64,
        "n_kv_heads": 8,
        "d_ff": 28672,
        "max_seq_len": 4096,
    },
    "classic-tiny": {
        **_CLASSIC,
        "vocab_size": 320,
        "d_model": 64,
        "n_layers": 2,
        "n_heads": 4,
        "d_ff": 256,
        "max_seq_len": 256,
    },
    # GPT-2 small shape (124M with GPT-2's 50257 vocabulary; 50304 is padded to a multiple of 64)
    "classic-125m": {
        **_CLASSIC,
        "vocab_size": 50304,
        "d_model": 768,
        "n_layers": 12,
        "n_heads": 12,
        "d_ff": 3072,
        "max_seq_len": 1024,
    },
    "classic-1.3b": {
        **_CLASSIC,
        "vocab_size": 50304,
        "d_model": 2048,
        "n_layers": 24,
        "n_heads": 16,
        "d_ff": 8192,
        "max_seq_len": 2048,
    },
    "classic-7b": {
        **_CLASSIC,
        "vocab_size": 50304,
        "d_model": 4096,
        "n_layers": 32,
        "n_heads": 32,
        "d_ff": 16384,
        "max_seq_len": 2048,
    },
}
