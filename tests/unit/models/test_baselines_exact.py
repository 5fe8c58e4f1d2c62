"""The baselines' fast paths give the plain computation's results: the same indices and the same bits.

* the pruned greedy coreset selects what the dense loop over all rows selects;
* ``nearest`` / ``distances`` are ``torch.cdist``'s values (its matrix-product form, the bank padded once);
* PaDiM's Gaussians and distances do not depend on the thread count.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmrad.models import baselines
from mmrad.models.baselines import (
    PaDiM,
    PaDiMConfig,
    _greedy_dense,
    _greedy_pruned,
    distances,
    greedy_coreset,
    nearest,
    pad_bank,
)


def _clustered(n: int, k: int, seed: int, centres: int = 40, spread: float = 0.3) -> torch.Tensor:
    """Patch-like features: blobs of different widths around random centres, far from the origin."""
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(centres, k, generator=g) * 3 + 10
    which = torch.randint(centres, (n,), generator=g)
    width = torch.rand(centres, 1, generator=g) * spread * 2
    return c[which] + torch.randn(n, k, generator=g) * width[which]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("n,k,size,seed", [(3000, 32, 300, 0), (2000, 128, 400, 1), (500, 8, 500, 2),
                                           (1200, 16, 1, 3), (800, 64, 80, 4)])
def test_pruned_greedy_selects_what_the_dense_loop_selects(n, k, size, seed):
    z = _clustered(n, k, seed)
    start = seed * 7 % n
    dense = _greedy_dense(z, size, start)
    pruned = _greedy_pruned(z, size, start)
    torch.testing.assert_close(pruned, dense, rtol=0, atol=0)
    torch.testing.assert_close(greedy_coreset(z, size, start), dense, rtol=0, atol=0)  # the CPU takes pruned


def test_pruned_greedy_with_duplicates_and_every_step_pruned():
    z = _clustered(1500, 16, 5, centres=10, spread=0.05)
    z[700:760] = z[10]  # exact duplicates: equal gaps, first index wins in both
    for share in (0.0, 0.25, 1.0):  # 0: a dense step whenever a row is left; 1: gathered rows after the first
        torch.testing.assert_close(_greedy_pruned(z, 600, 3, dense_share=share), _greedy_dense(z, 600, 3),
                                   rtol=0, atol=0)


def test_pruned_greedy_skips_most_rows(monkeypatch):
    """It is faster because few rows are left per step: count the rows of the gathered gemvs."""
    z = _clustered(4000, 32, 6)
    rows = []
    real = torch.index_select
    monkeypatch.setattr(baselines.torch, "index_select",
                        lambda x, dim, index: rows.append(len(index)) or real(x, dim, index))
    _greedy_pruned(z, 400, 0)
    assert rows and sum(rows) / (400 * 4000) < 0.3


def test_gathered_column_major_gemv_gives_each_row_the_same_bits():
    """What the pruned loop relies on: a row's gemv result does not depend on the other rows in the matrix."""
    z = _clustered(5000, 128, 7)
    cols = z.T.contiguous().T
    norms = (z * z).sum(dim=1)
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        c = int(torch.randint(len(z), (1,), generator=g))
        full = torch.addmv(norms, cols, cols[c], alpha=-2)
        rows = torch.randperm(len(z), generator=g)[: int(torch.randint(1, 3000, (1,), generator=g))].sort().values
        block = torch.index_select(z, 0, rows).T.contiguous().T
        torch.testing.assert_close(torch.addmv(norms[rows], block, cols[c], alpha=-2), full[rows], rtol=0, atol=0)


def test_greedy_coreset_size_rule():
    z = _clustered(50, 4, 8)
    assert greedy_coreset(z, 1, 7).tolist() == [7]
    with pytest.raises(ValueError, match="coreset size"):
        greedy_coreset(z, 51, 0)


@pytest.mark.parametrize("queries,bank_rows,chunk", [(1000, 300, 256), (600, 20, 100), (30, 10, 7), (5, 40, 4096),
                                                     (260, 26, 128)])
def test_nearest_is_cdist(queries, bank_rows, chunk):
    """Bank sizes and chunk tails on both sides of cdist's switch to its matrix-product form (25 rows)."""
    q, bank = _clustered(queries, 96, 9), _clustered(bank_rows, 96, 10)
    best = [torch.cdist(q[s:s + chunk], bank).min(dim=1) for s in range(0, len(q), chunk)]  # the plain search
    dist, index = nearest(q, bank, chunk)
    torch.testing.assert_close(dist, torch.cat([b.values for b in best]), rtol=0, atol=0)
    torch.testing.assert_close(index, torch.cat([b.indices for b in best]), rtol=0, atol=0)
    padded = pad_bank(bank)
    torch.testing.assert_close(nearest(q, bank, chunk, padded)[0], dist, rtol=0, atol=0)
    for rows in (q[:1], q[:30]):  # the image score's neighbourhood query: one row
        torch.testing.assert_close(distances(rows, bank, padded), torch.cdist(rows, bank), rtol=0, atol=0)


def test_padim_same_bytes_for_any_thread_count():
    g = torch.Generator().manual_seed(11)
    images = (torch.rand(6, 64, 64, 3, generator=g) * 255).to(torch.uint8).numpy()
    results = []
    for threads in (2, 1):
        torch.set_num_threads(threads)
        model = PaDiM(PaDiMConfig("resnet18", 40, 0), progress=False).fit(images[:4])
        results.append((model.covariance_, model.whiten_, model.score(images[4:])[0]))
        assert torch.get_num_threads() == threads  # restored after the one-thread parts
    torch.set_num_threads(1)
    for a, b in zip(*results):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
