"""The autotuning tables and their filters (pure host-side logic)."""

from __future__ import annotations

import pytest
import torch

from kernels import attention as A
from kernels import settings
from kernels import swiglu as S
from kernels._runtime import config_pruner, select_configs

H100_SMEM = 227 * 1024


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@pytest.mark.parametrize(
    "table,outer,inner",
    [(A._FWD_TABLE, "BLOCK_M", "BLOCK_N"), (A._DQ_TABLE, "BLOCK_M", "BLOCK_N"), (A._DKDV_TABLE, "BLOCK_N", "BLOCK_M")],
    ids=["fwd", "dq", "dkdv"],
)
def test_tables_keep_the_tiling_invariants(table: list, outer: str, inner: str) -> None:
    for row in table:
        assert _pow2(row[outer]) and _pow2(row[inner]) and row[inner] >= 16
        assert row[outer] % row[inner] == 0, row
    # with every row limited to small head dims, head dim 128 would have nothing to try
    assert any("max_block_d" not in row for row in table)


def _args(dtype: torch.dtype, block_d: int, seq_bucket: int = 4096) -> dict:
    return {"Q": torch.empty(0, dtype=dtype), "BLOCK_D": block_d, "seq_bucket": seq_bucket}


@pytest.fixture
def autotune_on():
    with settings.override(autotune=True):
        yield


@pytest.fixture
def autotune_off():
    with settings.override(autotune=False):
        yield


@pytest.fixture
def h100_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(A, "_budget_for", lambda t: H100_SMEM)


@pytest.mark.usefixtures("h100_budget")
@pytest.mark.usefixtures("autotune_on")
def test_pruner_applies_head_dim_limits_and_shared_memory() -> None:
    configs = select_configs(A._FWD_TABLE, A._FWD_INTERPRETER, built_for_interpreter=False)
    prune = config_pruner(A._keep_fwd)

    small = prune(configs, _args(torch.bfloat16, 64))
    large = prune(configs, _args(torch.bfloat16, 128))
    assert len(small) == len(configs)
    assert 0 < len(large) < len(small)
    assert all(c.max_block_d is None for c in large)
    # fp32 doubles the tiles in shared memory: the deepest pipelines no longer fit
    for c in prune(configs, _args(torch.float32, 128)):
        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        assert 4 * (bm * 128 + c.num_stages * 2 * bn * 128) <= H100_SMEM
    # short sequences do not get tiles much longer than themselves
    assert all(c.kwargs["BLOCK_M"] <= 64 for c in prune(configs, _args(torch.bfloat16, 64, seq_bucket=32)))


@pytest.mark.usefixtures("h100_budget")
@pytest.mark.usefixtures("autotune_off")
def test_without_autotuning_the_first_suitable_row_is_used() -> None:
    for table, keep in ((A._FWD_TABLE, A._keep_fwd), (A._DKDV_TABLE, A._keep_dkdv), (A._DQ_TABLE, A._keep_dq)):
        configs = select_configs(table, {}, built_for_interpreter=False)
        for block_d in (64, 128):
            (chosen,) = config_pruner(keep)(configs, _args(torch.bfloat16, block_d))
            first = next(r for r in table if r.get("max_block_d", block_d) >= block_d)
            assert chosen.kwargs == {k: first[k] for k in ("BLOCK_M", "BLOCK_N")}
            assert (chosen.num_warps, chosen.num_stages) == (first["num_warps"], first["num_stages"])


@pytest.mark.usefixtures("autotune_on")
def test_pruner_never_returns_nothing() -> None:
    configs = select_configs(S._TABLE, S._INTERPRETER, built_for_interpreter=False)
    kept = config_pruner(lambda c, a: False)(configs, {"n_cols": 10})
    assert [c.kwargs["BLOCK"] for c in kept] == [min(r["BLOCK"] for r in S._TABLE)]


def test_interpreter_uses_one_pinned_config() -> None:
    configs = select_configs(A._FWD_TABLE, A._FWD_INTERPRETER, built_for_interpreter=True)
    assert [c.kwargs for c in configs] == [A._FWD_INTERPRETER]
