"""PaDiM and PatchCore baselines: shapes, planted anomalies, determinism, the recipes' numbers.

Small and fast on purpose: 64x64 fundus phantoms, ResNet-18 with seeded random
weights (gross anomalies are found even without pretraining).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision

from mmrad.models.baselines import (
    PaDiM,
    PaDiMConfig,
    PatchCore,
    PatchCoreConfig,
    coreset_size,
    covering_radius,
)
from mmrad.models.mmrad import ResNetTrunk
from mmrad.synthetic.phantom.eye import Eye
from mmrad.synthetic.phantom.fundus import render_fundus

SIZE = 64
PATCH = np.s_[24:40, 24:40]  # the planted 16x16 anomaly


def padim_config(**changes) -> PaDiMConfig:
    """PaDiM with the paper's d = 100 on resnet18 (seed 0), changed where a test says."""
    return PaDiMConfig(**{"cnn": "resnet18", "channels": 100, "seed": 0, **changes})


def patchcore_config(**changes) -> PatchCoreConfig:
    """PatchCore with a 10 % coreset on resnet18 (seed 0), changed where a test says."""
    return PatchCoreConfig(**{"cnn": "resnet18", "coreset_ratio": 0.1, "seed": 0, **changes})


def fundus(seeds) -> np.ndarray:
    return np.stack([render_fundus(Eye.sample(s), (SIZE, SIZE)).image for s in seeds])


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tiny workloads gain nothing from a second thread, and OpenMP's fork/join on
    a shared CPU (another job running) slows them several-fold: run on one, then restore."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data() -> dict[str, np.ndarray]:
    train = fundus(range(12))
    healthy = fundus(range(100, 106))
    anomalous = healthy.copy()
    for i, image in enumerate(anomalous):
        image[PATCH] = 255 if i % 2 == 0 else 0  # bright and dark patches
    return dict(train=train, healthy=healthy, anomalous=anomalous)


@pytest.fixture(scope="module")
def padim(data) -> PaDiM:
    return PaDiM(padim_config(cnn="resnet18"), progress=False).fit(data["train"])


@pytest.fixture(scope="module")
def patchcore(data) -> PatchCore:
    return PatchCore(patchcore_config(cnn="resnet18"), progress=False).fit(data["train"])


@pytest.fixture(scope="module")
def scored(data, padim, patchcore) -> dict:
    """{name: {"healthy": (maps, scores), "anomalous": (maps, scores)}}."""
    models = {"padim": padim, "patchcore": patchcore}
    return {name: {kind: m.score(data[kind]) for kind in ("healthy", "anomalous")} for name, m in models.items()}


# --- outputs -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["padim", "patchcore"])
def test_shapes_and_dtypes(scored, name):
    for maps, scores in scored[name].values():
        assert maps.shape == (6, SIZE, SIZE) and maps.dtype == np.float32
        assert scores.shape == (6,) and scores.dtype == np.float32
        assert np.isfinite(maps).all() and np.isfinite(scores).all()
        assert (maps >= 0).all() and (scores > 0).all()  # distances


def test_padim_image_score_is_map_max(scored):
    for maps, scores in scored["padim"].values():
        np.testing.assert_array_equal(scores, maps.reshape(len(maps), -1).max(axis=1))


@pytest.mark.parametrize("name", ["padim", "patchcore"])
def test_planted_anomaly_is_found(scored, name):
    maps, scores = scored[name]["anomalous"]
    _, healthy_scores = scored[name]["healthy"]
    outside = np.ones((SIZE, SIZE), bool)
    outside[PATCH] = False
    for m in maps:
        assert m[PATCH].min() > np.median(m[outside])
    assert scores.mean() > 1.5 * healthy_scores.mean()
    assert scores.min() > healthy_scores.max()  # a gross anomaly separates perfectly


# --- PaDiM's Gaussians --------------------------------------------------------------------


def test_padim_gaussians(data, padim):
    d = padim.config.channels
    assert padim.grid == (SIZE // 4, SIZE // 4)  # layer-1 grid
    assert padim.index.shape == (d,) and len(set(padim.index.tolist())) == d
    cov = padim.covariance_
    assert cov.shape == (16 * 16, d, d) and cov.dtype == torch.float32
    torch.testing.assert_close(cov, cov.transpose(1, 2), rtol=0, atol=0)
    assert (torch.linalg.cholesky_ex(cov.double()).info == 0).all()  # positive definite
    assert torch.linalg.eigvalsh(cov[:8].double()).min() > 0.99 * padim.config.epsilon

    emb = padim.embed(data["train"]).flatten(2).double()  # (N, d, P)
    torch.testing.assert_close(padim.mean_.double(), emb.mean(0).T, rtol=1e-5, atol=1e-5)
    p = 37  # one position: unbiased covariance + 0.01 I, as np.cov
    expected = np.cov(emb[:, :, p].numpy(), rowvar=False) + 0.01 * np.eye(d)
    np.testing.assert_allclose(cov[p].numpy(), expected, rtol=1e-4, atol=1e-5)

    # Mahalanobis: 0 at the mean; the closed form elsewhere.
    zero = padim.mahalanobis(emb.mean(0).T[None].float())
    assert zero.shape == (1, 256) and zero.abs().max() < 1e-3
    x = emb[0, :, p].numpy() - emb.mean(0)[:, p].numpy()
    expected = math.sqrt(x @ np.linalg.solve(expected, x))
    got = padim.mahalanobis(emb[:1].transpose(1, 2).float())[0, p]
    assert got.item() == pytest.approx(expected, rel=1e-3)


# --- PatchCore's coreset and score ----------------------------------------------------------


def test_coreset_size(data, patchcore):
    patches = len(data["train"]) * (SIZE // 8) ** 2  # layer-2 grid 8x8
    assert patchcore.n_train_patches == patches
    assert patchcore.memory_bank.shape == (math.ceil(0.1 * patches), 128 + 256)
    assert len(set(patchcore.coreset_index.tolist())) == len(patchcore.coreset_index)
    assert coreset_size(61_440, 0.1) == 6_144 and coreset_size(61_441, 0.1) == 6_145
    quarter = PatchCore(patchcore_config(cnn="resnet18", coreset_ratio=0.25), progress=False).fit(data["train"][:3])
    assert quarter.memory_bank.shape[0] == math.ceil(0.25 * 3 * 64)


def test_greedy_coreset_covers_better_than_random(data, patchcore):
    z = patchcore.selection_features(patchcore.features(data["train"]))
    assert z.shape == (patchcore.n_train_patches, 128)
    index = patchcore.coreset_index
    greedy = covering_radius(z, index)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        random = covering_radius(z, torch.randperm(len(z), generator=g)[: len(index)])
        assert greedy <= random
    # The bank holds the selected patches' full features.
    torch.testing.assert_close(patchcore.memory_bank, patchcore.features(data["train"])[index])


def test_patchcore_image_score_reweighting(data, patchcore, scored):
    """Recompute Eq. 7 of the PatchCore paper by brute force for each healthy image."""
    _, scores = scored["patchcore"]["healthy"]
    bank = patchcore.memory_bank.double()
    b = patchcore.config.neighbours
    for image, score in zip(data["healthy"], scores):
        queries = patchcore.features(image[None]).double()
        dist = torch.cdist(queries, bank)
        patch_scores, nearest = dist.min(dim=1)
        worst = int(patch_scores.argmax())
        s_star, m_star = patch_scores[worst].item(), int(nearest[worst])
        hood = torch.cdist(bank[m_star][None], bank)[0].argsort()[:b]  # m* first (distance 0)
        assert int(hood[0]) == m_star
        d = dist[worst, hood].numpy()
        weight = 1 - np.exp(d[0]) / np.exp(d).sum()
        assert score == pytest.approx(weight * s_star, rel=1e-4)
        assert (1 - 1 / b) * s_star * (1 - 1e-5) <= score <= s_star  # m* is the nearest of N_b


# --- determinism, trunk, weights ----------------------------------------------------------


def test_same_seed_same_maps(data, padim, patchcore, scored):
    rng_before = torch.get_rng_state()
    again = PaDiM(padim_config(cnn="resnet18"), progress=False).fit(data["train"])
    np.testing.assert_array_equal(again.score(data["anomalous"])[0], scored["padim"]["anomalous"][0])
    again = PatchCore(patchcore_config(cnn="resnet18"), progress=False).fit(data["train"])
    torch.testing.assert_close(again.coreset_index, patchcore.coreset_index, rtol=0, atol=0)
    np.testing.assert_array_equal(again.score(data["anomalous"])[0], scored["patchcore"]["anomalous"][0])
    assert torch.equal(torch.get_rng_state(), rng_before)  # the seeded random trunk forks the RNG

    other = PaDiM(padim_config(cnn="resnet18", seed=1), progress=False).fit(data["train"][:4])
    assert not torch.equal(other.index, padim.index)


def test_batch_size_does_not_change_maps(data, padim, scored):
    one = PaDiM(padim_config(cnn="resnet18"), batch_size=5, progress=False).fit(data["train"])
    np.testing.assert_allclose(one.score(data["healthy"])[0], scored["padim"]["healthy"][0], rtol=1e-4, atol=1e-4)


def test_given_trunk_and_feature_projection(data):
    trunk = ResNetTrunk("resnet18")
    model = PatchCore(patchcore_config(cnn="resnet18", feature_dim=32), trunk=trunk, progress=False)
    assert model.backbone.trunk is trunk
    model.fit(data["train"][:2])
    assert model.memory_bank.shape == (math.ceil(0.1 * 2 * 64), 32)
    maps, scores = model.score(data["healthy"][:1])
    assert maps.shape == (1, SIZE, SIZE) and np.isfinite(scores).all()


def test_resnet50_weights_are_loaded(tmp_path):
    torch.manual_seed(3)
    state = torchvision.models.resnet50().state_dict()
    path = tmp_path / "resnet50-test.pth"
    torch.save(state, path)
    model = PaDiM(padim_config(cnn="resnet50"), weights=(str(path), "torchvision"), progress=False)
    loaded = model.backbone.trunk.resnet.state_dict()
    for key in ("conv1.weight", "layer3.5.bn3.running_var"):
        torch.testing.assert_close(loaded[key], state[key], rtol=0, atol=0)
    with pytest.raises(ValueError, match="cnn must be 'resnet50'"):
        PaDiM(padim_config(cnn="resnet18"), weights=(str(path), "torchvision"))


# --- bad input ------------------------------------------------------------------------------


BAD = {
    "ndim": (np.zeros((4, 64, 64), np.uint8), r"shape \(N, H, W, 3\)"),
    "channels": (np.zeros((4, 64, 64, 1), np.uint8), r"shape \(N, H, W, 3\)"),
    "dtype": (np.zeros((4, 64, 64, 3), np.float32), "must be uint8"),
    "empty": (np.zeros((0, 64, 64, 3), np.uint8), "empty"),
    "tiny": (np.zeros((4, 16, 16, 3), np.uint8), "at least 32x32"),
    "list": ([np.zeros((64, 64, 3), np.uint8)] * 4, "numpy array"),
}


@pytest.mark.parametrize("cls,config", [(PaDiM, padim_config(cnn="resnet18")),
                                        (PatchCore, patchcore_config(cnn="resnet18"))])
def test_bad_input(cls, config, data):
    model = cls(config, progress=False)
    with pytest.raises(ValueError, match="not fitted: call fit"):
        model.score(data["healthy"])
    for images, message in BAD.values():
        with pytest.raises(ValueError, match=message):
            model.fit(images)
    model.fit(data["train"][:2])
    for images, message in BAD.values():
        with pytest.raises(ValueError, match=message):
            model.score(images)


def test_bad_parameters(data, padim):
    with pytest.raises(ValueError, match="at least 2 training images"):
        PaDiM(padim_config(cnn="resnet18"), progress=False).fit(data["train"][:1])
    with pytest.raises(ValueError, match="fitted on"):
        padim.score(np.zeros((1, 96, 96, 3), np.uint8))
    with pytest.raises(ValueError, match="exceeds the 448 channels"):
        PaDiM(padim_config(cnn="resnet18", channels=500), progress=False).fit(data["train"][:2])
    with pytest.raises(ValueError, match="coreset_ratio"):
        patchcore_config(coreset_ratio=0)
    with pytest.raises(ValueError, match="either trunk or weights"):
        PaDiM(padim_config(cnn="resnet18"), trunk=ResNetTrunk("resnet18"), weights=("x.pth", "torchvision"))
