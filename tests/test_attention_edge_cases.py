"""On GPU, causal 16-bit attention says once which attention runs (cuDNN's fused kernel,
or XLA's version and why cuDNN refused), instead of falling back silently. Run on CPU by giving
the attention the GPU platform and standing in for jax.nn.dot_product_attention."""

import logging

import jax
import jax.numpy as jnp
import pytest

from moejax.ops import layers


@pytest.fixture
def fake_gpu(monkeypatch):
    calls = []

    def fake_dpa(q, k, v, mask=None, is_causal=False, implementation=None):
        calls.append(implementation)
        if implementation == "cudnn" and fake_dpa.refuse:
            raise ValueError("cuDNN is not available on this machine\nsecond line")
        return jnp.zeros_like(q)

    monkeypatch.setattr(jax.nn, "dot_product_attention", fake_dpa)
    monkeypatch.setattr(layers.attention, "said", set(), raising=False)
    return fake_dpa, calls


def _run_twice():
    q = jnp.ones((1, 4, 2, 8), jnp.bfloat16)
    k = jnp.ones((1, 4, 2, 8), jnp.bfloat16)
    for _ in range(2):
        layers.attention(q, k, k, causal=True, platform="gpu")


def test_a_cudnn_fallback_is_said_once_with_the_reason(fake_gpu, caplog):
    fake, calls = fake_gpu
    fake.refuse = True
    with caplog.at_level(logging.WARNING, logger="moejax"):
        _run_twice()
    said = [r.getMessage() for r in caplog.records if r.name == "moejax"]
    assert said == ["causal 16-bit attention runs XLA's version: cuDNN's fused kernel refused q (1, 4, 2, 8) "
                    "(ValueError: cuDNN is not available on this machine)"]
    assert calls == ["cudnn", None, "cudnn", None]


def test_the_cudnn_kernel_is_said_once(fake_gpu, caplog):
    fake, calls = fake_gpu
    fake.refuse = False
    with caplog.at_level(logging.WARNING, logger="moejax"):
        _run_twice()
    assert [r.getMessage() for r in caplog.records if r.name == "moejax"] == [
        "causal 16-bit attention runs cuDNN's fused kernel"]
    assert calls == ["cudnn", "cudnn"]
