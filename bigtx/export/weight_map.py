"""Weight maps between bigtx state-dict keys and Hugging Face ones, kept as data.

A map is a table of rules. Each rule names one Hugging Face tensor, the bigtx tensor(s) it is
made of (``{layer}`` stands for the block index), and whether it is stored transposed. Three pure
functions apply a table: ``plan`` pairs the keys of a concrete state dict, ``combine`` builds a
Hugging Face tensor from bigtx tensors and ``split`` does the reverse. Nothing here reads files,
so the same tables serve export, import and tests.

Two layouts need more than renaming, and both are rows of the GPT-2 table:

- GPT-2 stores its linear layers as ``Conv1D`` with weights ``[in, out]``, the transpose of
  ``nn.Linear``'s ``[out, in]`` (``transpose=True``).
- GPT-2 fuses the query, key and value projections into one ``c_attn``; its output features are
  q, then k, then v (``c_attn(x).split(d_model, dim=2)``), so the bigtx weights are concatenated
  along their output dimension (dim 0 of an ``nn.Linear`` weight), before the transpose.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Rule:
    """One Hugging Face tensor = the listed bigtx tensors concatenated on dim 0, maybe transposed."""

    hf: str
    bigtx: tuple[str, ...]
    transpose: bool = False


@dataclass(frozen=True)
class WeightMap:
    name: str
    rules: tuple[Rule, ...]


def _rules(*rows: tuple) -> tuple[Rule, ...]:
    """Table rows ``(hf, bigtx)`` or ``(hf, bigtx, transpose)``; bigtx is a key or a tuple of keys."""
    out = []
    for row in rows:
        hf, bigtx, *rest = row
        out.append(Rule(hf, bigtx if isinstance(bigtx, tuple) else (bigtx,), *rest))
    return tuple(out)


# LlamaForCausalLM. Every rule is 1:1 and nothing is transposed: both sides are nn.Linear, and the
# bigtx attention uses the same rotate_half RoPE layout, so q_proj/k_proj need no permutation.
LLAMA = WeightMap(
    "llama",
    _rules(
        ("model.embed_tokens.weight", "embed.weight"),
        ("model.layers.{layer}.input_layernorm.weight", "blocks.{layer}.attn_norm.weight"),
        ("model.layers.{layer}.self_attn.q_proj.weight", "blocks.{layer}.attn.q_proj.weight"),
        ("model.layers.{layer}.self_attn.q_proj.bias", "blocks.{layer}.attn.q_proj.bias"),
        ("model.layers.{layer}.self_attn.k_proj.weight", "blocks.{layer}.attn.k_proj.weight"),
        ("model.layers.{layer}.self_attn.k_proj.bias", "blocks.{layer}.attn.k_proj.bias"),
        ("model.layers.{layer}.self_attn.v_proj.weight", "blocks.{layer}.attn.v_proj.weight"),
        ("model.layers.{layer}.self_attn.v_proj.bias", "blocks.{layer}.attn.v_proj.bias"),
        ("model.layers.{layer}.self_attn.o_proj.weight", "blocks.{layer}.attn.o_proj.weight"),
        ("model.layers.{layer}.self_attn.o_proj.bias", "blocks.{layer}.attn.o_proj.bias"),
        ("model.layers.{layer}.post_attention_layernorm.weight", "blocks.{layer}.mlp_norm.weight"),
        ("model.layers.{layer}.mlp.gate_proj.weight", "blocks.{layer}.mlp.gate_proj.weight"),
        ("model.layers.{layer}.mlp.gate_proj.bias", "blocks.{layer}.mlp.gate_proj.bias"),
        ("model.layers.{layer}.mlp.up_proj.weight", "blocks.{layer}.mlp.up_proj.weight"),
        ("model.layers.{layer}.mlp.up_proj.bias", "blocks.{layer}.mlp.up_proj.bias"),
        ("model.layers.{layer}.mlp.down_proj.weight", "blocks.{layer}.mlp.down_proj.weight"),
        ("model.layers.{layer}.mlp.down_proj.bias", "blocks.{layer}.mlp.down_proj.bias"),
        ("model.norm.weight", "final_norm.weight"),
        # only present when the head is untied; a tied model has no lm_head key on either side
        ("lm_head.weight", "lm_head.weight"),
    ),
)

_QKV_W = ("blocks.{layer}.attn.q_proj.weight", "blocks.{layer}.attn.k_proj.weight", "blocks.{layer}.attn.v_proj.weight")
_QKV_B = ("blocks.{layer}.attn.q_proj.bias", "blocks.{layer}.attn.k_proj.bias", "blocks.{layer}.attn.v_proj.bias")

# GPT2LMHeadModel: Conv1D weights are transposed, q/k/v are fused into c_attn.
GPT2 = WeightMap(
    "gpt2",
    _rules(
        ("transformer.wte.weight", "embed.weight"),
        ("transformer.wpe.weight", "pos_embed.weight"),
        ("transformer.h.{layer}.ln_1.weight", "blocks.{layer}.attn_norm.weight"),
        ("transformer.h.{layer}.ln_1.bias", "blocks.{layer}.attn_norm.bias"),
        ("transformer.h.{layer}.attn.c_attn.weight", _QKV_W, True),
        ("transformer.h.{layer}.attn.c_attn.bias", _QKV_B),
        ("transformer.h.{layer}.attn.c_proj.weight", "blocks.{layer}.attn.o_proj.weight", True),
        ("transformer.h.{layer}.attn.c_proj.bias", "blocks.{layer}.attn.o_proj.bias"),
        ("transformer.h.{layer}.ln_2.weight", "blocks.{layer}.mlp_norm.weight"),
        ("transformer.h.{layer}.ln_2.bias", "blocks.{layer}.mlp_norm.bias"),
        ("transformer.h.{layer}.mlp.c_fc.weight", "blocks.{layer}.mlp.fc_in.weight", True),
        ("transformer.h.{layer}.mlp.c_fc.bias", "blocks.{layer}.mlp.fc_in.bias"),
        ("transformer.h.{layer}.mlp.c_proj.weight", "blocks.{layer}.mlp.fc_out.weight", True),
        ("transformer.h.{layer}.mlp.c_proj.bias", "blocks.{layer}.mlp.fc_out.bias"),
        ("transformer.ln_f.weight", "final_norm.weight"),
        ("transformer.ln_f.bias", "final_norm.bias"),
        ("lm_head.weight", "lm_head.weight"),
    ),
)

WEIGHT_MAPS = {m.name: m for m in (LLAMA, GPT2)}


@dataclass(frozen=True)
class Conversion:
    """One Hugging Face tensor and the bigtx tensors it is made of, with their shapes."""

    hf: str
    bigtx: tuple[str, ...]
    transpose: bool
    bigtx_shapes: tuple[tuple[int, ...], ...]

    @property
    def hf_shape(self) -> tuple[int, ...]:
        first = self.bigtx_shapes[0]
        shape = (sum(s[0] for s in self.bigtx_shapes), *first[1:])
        return tuple(reversed(shape)) if self.transpose else shape


def _pattern(template: str) -> re.Pattern[str]:
    return re.compile(re.escape(template).replace(re.escape("{layer}"), r"(?P<layer>\d+)") + "$")


def plan(wmap: WeightMap, bigtx_shapes: Mapping[str, Sequence[int]]) -> list[Conversion]:
    """Pair every key of a bigtx state dict (``key -> shape``) with its Hugging Face key.

    Returns the conversions in the order of the bigtx keys. Raises ``ValueError`` naming the
    keys that no rule covers, or a fused tensor whose parts are not all present.
    """
    patterns = [(rule, [_pattern(t) for t in rule.bigtx]) for rule in wmap.rules]
    found: dict[tuple[int, str], dict[int, str]] = {}
    unmapped = []
    for key in bigtx_shapes:
        for index, (_, pats) in enumerate(patterns):
            hit = next(((part, m) for part, p in enumerate(pats) if (m := p.match(key))), None)
            if hit is not None:
                part, match = hit
                layer = match.groupdict().get("layer") or ""
                found.setdefault((index, layer), {})[part] = key
                break
        else:
            unmapped.append(key)
    if unmapped:
        raise ValueError(f"no {wmap.name} name for bigtx tensor(s): {', '.join(unmapped)}")
    out = []
    for (index, layer), parts in found.items():
        rule = patterns[index][0]
        if len(parts) != len(rule.bigtx):
            expected = [t.replace("{layer}", layer) for t in rule.bigtx]
            raise ValueError(
                f"{wmap.name} tensor {rule.hf} needs all of {expected}; found only {sorted(parts.values())}"
            )
        keys = tuple(parts[i] for i in range(len(rule.bigtx)))
        out.append(
            Conversion(
                hf=rule.hf.replace("{layer}", layer),
                bigtx=keys,
                transpose=rule.transpose,
                bigtx_shapes=tuple(tuple(bigtx_shapes[k]) for k in keys),
            )
        )
    return out


def combine(conv: Conversion, parts: Sequence[Tensor]) -> Tensor:
    """The Hugging Face tensor of ``conv`` from its bigtx tensors (in ``conv.bigtx`` order)."""
    tensor = parts[0] if len(parts) == 1 else torch.cat(list(parts), dim=0)
    return tensor.t().contiguous() if conv.transpose else tensor


def split(conv: Conversion, tensor: Tensor) -> list[Tensor]:
    """The bigtx tensors of ``conv`` (in ``conv.bigtx`` order) from its Hugging Face tensor."""
    if tuple(tensor.shape) != conv.hf_shape:
        raise ValueError(f"{conv.hf}: shape {tuple(tensor.shape)}, expected {conv.hf_shape}")
    if conv.transpose:
        tensor = tensor.t()
    sizes = [s[0] for s in conv.bigtx_shapes]
    return [t.contiguous() for t in torch.split(tensor, sizes, dim=0)]
