"""Fixtures shared by several test files. Importable helpers live in reference.py (pieces written from the
formulas) and hf_models.py (tiny checkpoints built with transformers)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def hub_checkpoint(tmp_path_factory):
    """hub_checkpoint(name) -> (transformers model, checkpoint folder) for hf_models.SPECS[name], built once
    per session and shared by every file that asks for it (the build is seeded, so it is the same checkpoint
    each file would build for itself). Treat both as read-only: copy the folder before changing it."""
    pytest.importorskip("transformers")
    from hf_models import SPECS, make_checkpoint

    built: dict[str, tuple] = {}

    def get(name: str):
        if name not in built:
            built[name] = make_checkpoint(SPECS[name], tmp_path_factory.mktemp(name))
        return built[name]

    return get


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """models(name): the tiny checkpoint of `hf_models.SPECS[name]` (plain path, fp32), written and loaded
    once per test module, lazily."""
    import torch
    from hf_models import SPECS, make_checkpoint

    import seekwen

    cache: dict[str, torch.nn.Module] = {}

    def get(name: str):
        if name not in cache:
            _, folder = make_checkpoint(SPECS[name], tmp_path_factory.mktemp(name))
            cache[name] = seekwen.load(folder, dtype=torch.float32, fast=False)
        return cache[name]

    return get


@pytest.fixture(params=["avx2", "avx512"])
def isa(request):
    """Run the test with the kernels' instruction set forced (skipped where it is missing), then restore
    the default."""
    from seekwen.fast import kernels

    k = kernels.get()
    if k is None or request.param not in kernels.isas():
        pytest.skip(f"{request.param} not available on this CPU / compiler")
    before = k.isa()
    k.set_isa(request.param)
    yield request.param
    k.set_isa(before)
