"""The patched model is a pure function of its input: it compiles whole, exports with torch.export, and two
threads may run one patched model at once."""

from __future__ import annotations

import threading
import warnings

import pytest
import timm
import torch

from dsm_tune.evaluation.demo import build_demo_model
from dsm_tune.merging import DSMConfig, Stage, apply_dsm


def demo_with(config_for):
    model = build_demo_model().eval()
    return apply_dsm(model, config_for(model)), torch.randn(2, 1, 32, 32)


def delayed_hierarchical(model) -> DSMConfig:
    return DSMConfig.for_model(model, start_layer=1, hierarchy_depth=2,
                               stages=[Stage(1, ratio=0.5), Stage(2, ratio=0.25), Stage(2, ratio=0.3)],
                               proportional_attention=True)


def vit_small(**kwargs):
    # Random weights at 64x64 keep the real ViT-S/16 width, depth and heads with a 4x4 grid.
    return timm.create_model("vit_small_patch16_224", pretrained=False, img_size=64, **kwargs).eval()


def _without_warnings(action):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = action()
    return result, [f"{w.category.__name__}: {w.message}" for w in caught]


@pytest.mark.parametrize("case", ["demo", "vit_small_avg_pool"])
def test_fullgraph_compile_matches_eager_without_warnings(case):
    torch._dynamo.reset()
    if case == "demo":
        model, x = demo_with(delayed_hierarchical)
    else:
        model = vit_small(class_token=False, global_pool="avg")
        apply_dsm(model, DSMConfig.for_model(model, start_layer=2, hierarchy_depth=1,
                                             stages=[Stage(1, ratio=0.5), Stage(9, ratio=0.25)]))
        x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        expected = model(x)
        # aot_eager runs dynamo capture and functionalization (where graph breaks and mutations surface) without
        # paying for inductor's C++ builds on a shared CPU; benchmarks/runtime_speed.py times inductor.
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        actual, caught = _without_warnings(lambda: compiled(x))
    torch._dynamo.reset()
    assert caught == []
    assert torch.allclose(actual, expected, atol=1e-5)


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_torch_export_round_trip_without_warnings(pool):
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=4, global_pool=pool,
                              class_token=pool == "token").eval()
    apply_dsm(model, DSMConfig.for_model(model, start_layer=1, hierarchy_depth=1,
                                         stages=[Stage(1, ratio=0.5), Stage(2, ratio=0.25)]))
    x = torch.randn(2, 3, 64, 64)
    program, caught = _without_warnings(lambda: torch.export.export(model, (x,)))
    assert caught == []
    with torch.inference_mode():
        expected = model(x)
        actual = program.module()(x)
        other = torch.randn(2, 3, 64, 64)
        assert torch.allclose(program.module()(other), model(other), atol=1e-5)
    assert torch.allclose(actual, expected, atol=1e-5)


def test_two_threads_on_one_patched_model_match_sequential_runs():
    """Nothing is stored on the model during forward: a second thread's whole forward, run while the first is
    between its block stack and its pooling, must not change the first one's result."""
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=4, class_token=False,
                              global_pool="avg").eval()
    apply_dsm(model, DSMConfig.for_model(model, start_layer=0, hierarchy_depth=1,
                                         stages=[Stage(1, ratio=0.5), Stage(3, ratio=0.25)]))
    inputs = {"first": torch.randn(2, 3, 64, 64), "second": torch.randn(2, 3, 64, 64) * 3}
    with torch.inference_mode():
        expected = {name: model(x) for name, x in inputs.items()}
    assert not torch.allclose(expected["first"], expected["second"])

    first_paused, second_done = threading.Event(), threading.Event()

    def hold_first_thread(_module, _args):
        if threading.current_thread().name == "first":
            first_paused.set()
            second_done.wait(timeout=60)

    results: dict[str, torch.Tensor] = {}

    def forward(name: str) -> None:
        if name == "second":
            first_paused.wait(timeout=60)
        with torch.inference_mode():
            results[name] = model(inputs[name])
        if name == "second":
            second_done.set()

    hook = model.norm.register_forward_pre_hook(hold_first_thread)  # runs between the blocks and the pooling
    threads = [threading.Thread(target=forward, args=(name,), name=name) for name in inputs]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    finally:
        hook.remove()
    assert first_paused.is_set() and second_done.is_set()
    for name in inputs:
        assert torch.equal(results[name], expected[name])
