"""CPU microbenchmarks for pytest-benchmark: `pytest bench/ --benchmark-only`.

Not part of `make test` (which runs tests/ only) and never pass/fail on speed. Small shapes,
fp32, fwd+bwd of each loss for the CPU providers (torch.compile is left out: its compile time
dwarfs these shapes; `fastkd bench` times it). Providers that cannot run here are skipped with
the reason from the harness.
"""

import pytest
import torch

from fastkd.bench.providers import (
    GRAD_LEAVES,
    LossOptions,
    Shape,
    build_provider,
    clear_grads,
    make_inputs,
    skip_reason,
)

SHAPES = {
    "distillation": Shape(256, 8192),
    "fused_linear_distillation": Shape(256, 8192, 128, 128),
    "sparse_distillation": Shape(256, 8192, k=32),
}
PROVIDERS = ("eager", "torch", "cpu")
OPTIONS = LossOptions(temperature=2.0, alpha=0.5)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("loss", sorted(SHAPES))
def test_fwd_bwd(benchmark, loss, provider):
    device = torch.device("cpu")
    reason = skip_reason(loss, provider, device, torch.float32)
    if reason is not None:
        pytest.skip(reason)
    fn = build_provider(loss, provider, OPTIONS)
    inputs = make_inputs(loss, SHAPES[loss], torch.float32, device, OPTIONS)

    def setup():
        clear_grads(loss, inputs)  # untimed: a step starts without gradients

    benchmark.group = f"{loss} fwd+bwd fp32 N={SHAPES[loss].n} V={SHAPES[loss].v}"
    benchmark.pedantic(lambda: fn(inputs).backward(), setup=setup, rounds=10,
                       warmup_rounds=2)
    assert all(inputs[name].grad is not None for name in GRAD_LEAVES[loss])
