"""Unit tests of KV-cache decoding and bigtx.model.generate."""

from __future__ import annotations

import pytest
import torch

from bigtx.config.spec import ModelSection
from bigtx.model import Transformer, generate


def build(**overrides: object) -> Transformer:
    model = Transformer(ModelSection(preset="tiny", **overrides))
    model.init_weights(0)
    # a larger init than the default makes the greedy path depend on the whole context
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(5.0)
    return model.eval()


def greedy_without_cache(model: Transformer, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt) :]


@pytest.mark.parametrize(
    "overrides",
    [{}, {"position": "learned", "norm_placement": "post"}, {"position": "sinusoidal", "n_kv_heads": 1}],
)
def test_cached_greedy_equals_recomputing_the_full_sequence(overrides: dict[str, object]) -> None:
    model = build(**overrides)
    prompt = [5, 17, 200, 3, 99]
    expected = greedy_without_cache(model, prompt, 24)
    assert generate(model, prompt, 24, greedy=True) == expected
    assert len(set(expected)) > 1  # the comparison is not trivially about a repeated token


def test_cache_in_chunks_matches_one_forward() -> None:
    model = build()
    ids = torch.randint(0, 320, (2, 30), generator=torch.Generator().manual_seed(0))
    cache = model.new_cache()
    with torch.no_grad():
        full = model(ids)
        parts = [model(ids[:, a:b], cache=cache) for a, b in ((0, 12), (12, 13), (13, 30))]
    assert cache.length == 30
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)


def test_stops_at_eos_without_returning_it() -> None:
    model = build()
    tokens = generate(model, [1, 2, 3], 10, greedy=True)
    assert generate(model, [1, 2, 3], 10, greedy=True, eos_id=tokens[3]) == tokens[:3]


def test_sampling_is_reproducible_with_a_seed_and_respects_top_k_top_p() -> None:
    model = build()
    a = generate(model, [7, 8], 16, temperature=1.5, seed=3)
    assert a == generate(model, [7, 8], 16, temperature=1.5, seed=3)
    assert len(a) == 16 and all(0 <= t < 320 for t in a)
    greedy = generate(model, [7, 8], 16, greedy=True)
    assert generate(model, [7, 8], 16, top_k=1, seed=0) == greedy
    assert generate(model, [7, 8], 16, top_p=1e-6, seed=0) == greedy
    assert generate(model, [7, 8], 16, temperature=0.0) == greedy


def test_accepts_a_tensor_prompt_and_restores_training_mode() -> None:
    model = build().train()
    assert generate(model, torch.tensor([4, 5, 6]), 5, greedy=True) == generate(model, [4, 5, 6], 5, greedy=True)
    assert model.training


@pytest.mark.parametrize(("prompt", "n", "kwargs"), [([], 3, {}), ([1] * 250, 10, {}), ([1], 3, {"temperature": -1.0})])
def test_rejects_bad_requests(prompt: list[int], n: int, kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="generate:"):
        generate(build(), prompt, n, **kwargs)
