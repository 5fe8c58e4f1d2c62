"""The two classic baselines of the paper's tables: PaDiM and PatchCore.

Both fit on healthy images only and turn test images into anomaly maps, using
the same frozen CNN trunk family as MMRAD (:class:`mmrad.models.mmrad.ResNetTrunk`,
optionally with the same pretrained ResNet-50 weights, loaded through
:func:`mmrad.models.weights.load_resnet50`). Plain library code, no training loop::

    PaDiM(PaDiMConfig(cnn, channels, seed), weights=None | (path, fmt), trunk=None, device="cpu").fit(healthy)
    maps, scores = model.score(images)   # (N, H, W) float32, (N,) float32

Input: ``uint8`` arrays ``(N, H, W, 3)`` (OCT as three equal channels) at the
prepared resolution; they are normalised with the ImageNet mean / std that
:mod:`mmrad.models.mmrad` uses (``PIXEL_MEAN`` / ``PIXEL_STD`` in 0..255 units).

PaDiM (Defard et al. 2021; facts.md Sec. 4)
-------------------------------------------
1. Features of layer1, layer2 and layer3, concatenated on the layer-1 grid
   (H/4 x W/4). A random subset of ``channels`` of the concatenated channels
   is kept (seeded; chosen once, sorted). Only the chosen channels are
   upsampled. The PaDiM paper uses d = 100 for ResNet-18 and 550 for
   Wide-ResNet-50 (:data:`PADIM_PAPER_CHANNELS`); for ResNet-50 the MMRAD
   paper says "the randomly selected dimension was set to 100", our default.
   Layers 2 and 3 reach the layer-1 grid by *nearest* upsampling, i.e. each
   coarse cell is copied to the fine cells it covers, as PaDiM's embedding
   concatenation does.
2. One Gaussian per grid position over the training images: mean, and the
   unbiased sample covariance (divided by N - 1, as ``np.cov``) plus
   ``epsilon * I`` (0.01). Hence PaDiM needs at least two training images.
   The covariance is computed in float64 from the centred features, position
   chunk by position chunk; its Cholesky factor L is inverted there too and
   ``L^-1`` is stored in float32, so the Mahalanobis distance is
   ``||L^-1 (x - mu)||`` (numerically nicer than forming the inverse).
   ``covariance_`` (positions, d, d) float32 is kept for inspection.
3. Test score per position = Mahalanobis distance; the map is upsampled
   bilinearly (``align_corners=False``) to the image size and blurred with a
   Gaussian of sigma 4 (``scipy.ndimage.gaussian_filter``, its default
   ``truncate=4`` and ``mode="reflect"``). Image score = max of the map.

PatchCore (Roth et al. 2022; facts.md Sec. 4)
---------------------------------------------
1. Features of layer2 and layer3, each averaged over its 3x3 neighbourhood
   (``avg_pool2d(3, stride=1, padding=1)``; the zero padding counts, as in
   PatchCore's zero-padded unfold), layer3 upsampled bilinearly to layer2's
   grid (H/8 x W/8), concatenated: one patch feature per layer-2 cell
   (dim 512 + 1024 = 1536 for ResNet-50, 128 + 256 = 384 for ResNet-18).
   ``feature_dim`` (default ``None``: keep all) optionally maps them with a
   seeded Gaussian random projection (entries N(0, 1/feature_dim), which
   preserves distances in expectation) to a fixed dimension. The official
   PatchCore code instead average-pools the channels of each layer to 1024;
   we keep the plain concatenation by default (it is only 1536 wide).
2. Memory bank: a greedy k-center coreset of ``ceil(coreset_ratio * patches)``
   training patches (ratio 0.1, the MMRAD paper's "sampling ratio").
   As in the PatchCore paper, distances for the *selection* are computed on a
   sparse random projection of the features to ``projection_dim`` = 128
   dimensions (Achlioptas / Li "very sparse" projection: entries
   +-sqrt(s / k) with probability 1 / (2 s) each, 0 otherwise, s = sqrt(D),
   k = 128; seeded). The start patch is drawn with the seed; each step adds
   the patch farthest from the selection so far and updates every patch's
   distance to the selection with one matrix-vector product (memory O(P));
   on the CPU that loop runs on one thread and skips the patches the
   triangle inequality proves unaffected, with the same selection (see
   ``greedy_coreset``). The projection and all nearest-neighbour searches
   run in chunks of ``chunk`` rows, float32, with ``torch.cdist``'s own
   arithmetic (``nearest``: the same bits, the bank padded once). The bank
   keeps the selected patches' full features (not the projected ones).
3. Patch score = Euclidean distance of a test patch to its nearest bank
   feature. Map: upsampled bilinearly to the image size, blurred with sigma 4
   (as PaDiM).
4. Image score (PatchCore paper, Eq. 7): let ``m_test*`` be the test patch of
   largest patch score ``s*`` and ``m*`` its nearest bank feature;
   ``N_b(m*)`` are the ``neighbours`` (b = 9) nearest bank features of
   ``m*`` (``m*`` itself included, at distance 0). Then
   ``s = (1 - exp(||m_test* - m*||) / sum_{m in N_b(m*)} exp(||m_test* - m||)) * s*``,
   i.e. ``s* * (1 - softmax(d)[m*])`` with ``d`` the distances from
   ``m_test*`` to ``N_b(m*)`` (``torch.softmax``, so large distances do not
   overflow). A rare ``m*`` (far from its neighbours) gives a weight near 1,
   a ``m*`` in a dense region about ``1 - 1/b``. So the image score is *not*
   the map's maximum for PatchCore.

Shared choices
--------------
* Trunk: ``ResNetTrunk(cnn)`` (torchvision ResNet up to layer3), eval mode,
  frozen, channels-last, run under ``torch.inference_mode`` in batches of
  ``batch_size`` (default 8) with a tqdm progress bar. ``weights=(path, fmt)``
  loads a ResNet-50 checkpoint with ``load_resnet50`` ("torchvision",
  "lvm-med" into ``ResNetTrunk(cnn).resnet``; "vilref" into a
  ``ClipResNetTrunk``, whose stages have the same shapes); ``trunk=`` takes
  any module returning the three stage maps instead. Without either, the
  trunk is randomly initialised *from the config's seed* (under a forked RNG,
  the global one is untouched), so a model is reproducible either way.
* Determinism: the seed fixes the channel subset, the projections, the
  coreset's start patch and a random-init trunk; same seed + same inputs ->
  identical maps (on the same device and thread count; PaDiM's Gaussians and
  distances and the coreset run on one CPU thread whatever the count).
* Bad input (not a uint8 (N, H, W, 3) array, an empty set, images smaller
  than 32 px, a test size other than the fitted one for PaDiM, ``score``
  before ``fit``) raises ``ValueError`` with a message naming the rule.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn
from tqdm.auto import tqdm

from mmrad.models.mmrad import PIXEL_MEAN, PIXEL_STD, ResNetTrunk
from mmrad.models.weights import ClipResNetTrunk, load_resnet50

# The PaDiM paper's random channel counts; resnet50 follows the MMRAD paper ("set to 100").
PADIM_PAPER_CHANNELS = {"resnet18": 100, "resnet50": 100, "wide_resnet50_2": 550}
MIN_SIDE = 32  # layer3 is H/16: below 32 px there is hardly a grid left


# --------------------------------------------------------------------------------------
# Configurations
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PaDiMConfig:
    # from params.yaml (model.cnn, baselines.padim_channels, seed): no defaults here
    cnn: str
    channels: int  # random subset d of the layer1-3 channels
    seed: int
    # not parameters: the PaDiM paper's values
    epsilon: float = 0.01  # covariance regulariser
    sigma: float = 4.0  # Gaussian blur of the map, pixels

    def __post_init__(self):
        if self.channels < 1:
            raise ValueError(f"PaDiM channels must be >= 1, got {self.channels}")
        if self.epsilon <= 0:
            raise ValueError(f"PaDiM epsilon must be > 0, got {self.epsilon}")
        if self.sigma < 0:
            raise ValueError(f"sigma must be >= 0, got {self.sigma}")


@dataclass(frozen=True)
class PatchCoreConfig:
    # from params.yaml (model.cnn, baselines.patchcore_coreset_ratio, seed): no defaults here
    cnn: str
    coreset_ratio: float  # fraction of training patches kept in the memory bank
    seed: int
    # not parameters: the PatchCore paper's values
    projection_dim: int = 128  # sparse random projection used only to select the coreset
    neighbours: int = 9  # b of the image-score reweighting
    sigma: float = 4.0
    chunk: int = 4096  # rows per distance / projection chunk
    feature_dim: int | None = None  # optional random projection of the patch features

    def __post_init__(self):
        if not 0 < self.coreset_ratio <= 1:
            raise ValueError(f"coreset_ratio must be in (0, 1], got {self.coreset_ratio}")
        for name in ("projection_dim", "neighbours", "chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.feature_dim is not None and self.feature_dim < 1:
            raise ValueError(f"feature_dim must be >= 1 or None, got {self.feature_dim}")
        if self.sigma < 0:
            raise ValueError(f"sigma must be >= 0, got {self.sigma}")


# --------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------


def check_images(images, what: str = "images") -> None:
    """Raise ValueError unless ``images`` is a non-empty uint8 (N, H, W, 3) array."""
    if not isinstance(images, np.ndarray):
        raise ValueError(f"{what} must be a numpy array, got {type(images).__name__}")
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{what} must have shape (N, H, W, 3), got {images.shape}")
    if images.dtype != np.uint8:
        raise ValueError(f"{what} must be uint8 (0..255), got dtype {images.dtype}")
    if images.shape[0] == 0:
        raise ValueError(f"{what} is empty: need at least one image")
    if min(images.shape[1:3]) < MIN_SIDE:
        raise ValueError(f"{what} must be at least {MIN_SIDE}x{MIN_SIDE} pixels, got {images.shape[1:3]}")


def build_trunk(cnn: str, seed: int, trunk: nn.Module | None = None,
                weights: tuple[str, str] | None = None) -> nn.Module:
    """The frozen CNN: a given module, a ResNetTrunk with loaded weights, or a seeded random one."""
    if trunk is not None and weights is not None:
        raise ValueError("give either trunk or weights, not both")
    if trunk is None:
        if weights is not None:
            path, fmt = weights
            if cnn != "resnet50":
                raise ValueError(f"weights are ResNet-50 checkpoints; cnn must be 'resnet50', got {cnn!r}")
            if fmt == "vilref":  # CLIP's ModifiedResNet: its own stem, same stage shapes
                trunk = ClipResNetTrunk()
                load_resnet50(trunk, path, fmt=fmt)
            else:
                trunk = ResNetTrunk(cnn)
                load_resnet50(trunk.resnet, path, fmt=fmt)
        else:
            with torch.random.fork_rng(devices=[]):  # reproducible random init, global RNG untouched
                torch.manual_seed(seed)
                trunk = ResNetTrunk(cnn)
    trunk.eval().requires_grad_(False)
    return trunk.to(memory_format=torch.channels_last)


class _Backbone:
    """Runs the frozen trunk over uint8 images in batches: yields the three stage maps."""

    def __init__(self, trunk: nn.Module, device: str, batch_size: int, progress: bool):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.trunk = trunk.to(self.device)
        self.batch_size = batch_size
        self.progress = progress
        self.mean = torch.tensor(PIXEL_MEAN, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(PIXEL_STD, device=self.device).view(1, 3, 1, 1)

    def batches(self, images: np.ndarray, desc: str):
        """Yield (start index, [layer1, layer2, layer3]) per batch (callers run in inference mode)."""
        starts = range(0, len(images), self.batch_size)
        for start in tqdm(starts, desc=desc, unit="batch", disable=not self.progress, leave=False):
            chunk = torch.from_numpy(np.ascontiguousarray(images[start:start + self.batch_size]))
            x = chunk.to(self.device).permute(0, 3, 1, 2).float()
            x = ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
            yield start, [f.float().contiguous() for f in self.trunk(x)]


def finish_maps(grid_scores: torch.Tensor, size: tuple[int, int], sigma: float) -> np.ndarray:
    """(B, h, w) scores -> (B, H, W) float32 maps: bilinear upsampling, then Gaussian blur."""
    up = F.interpolate(grid_scores[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    maps = up.cpu().numpy().astype(np.float32, copy=False)
    if sigma > 0:
        maps = np.stack([ndimage.gaussian_filter(m, sigma) for m in maps])
    return maps.astype(np.float32, copy=False)


# torch.cdist (p = 2) switches to its matrix-product form when either side has more rows than this.
CDIST_MM_ROWS = 25


def pad_bank(bank: torch.Tensor) -> torch.Tensor:
    """``[bank, 1, ||bank||^2]``: the right operand of torch.cdist's matrix-product form, built once per bank."""
    norm = bank.pow(2).sum(-1, keepdim=True)
    return torch.cat([bank, torch.ones_like(norm), norm], -1)


def squared_distances(x: torch.Tensor, padded: torch.Tensor) -> torch.Tensor:
    """(n, M) squared distances as torch.cdist's matrix-product form computes them, before its clamp and
    sqrt: ``[-2x, ||x||^2, 1] @ padded.T`` (the form cdist takes when a side has more than CDIST_MM_ROWS rows)."""
    norm = x.pow(2).sum(-1, keepdim=True)
    return torch.cat([x.mul(-2), norm, torch.ones_like(norm)], -1).matmul(padded.mT)


def distances(x: torch.Tensor, bank: torch.Tensor, padded: torch.Tensor | None = None) -> torch.Tensor:
    """``torch.cdist(x, bank)``, the same bits, reusing ``padded = pad_bank(bank)`` across calls."""
    if padded is None or max(len(x), len(bank)) <= CDIST_MM_ROWS:
        return torch.cdist(x, bank)
    return squared_distances(x, padded).clamp_min_(0).sqrt_()


def nearest(queries: torch.Tensor, bank: torch.Tensor, chunk: int,
            padded: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Distance to and index of each query's nearest bank row, in query chunks: ``torch.cdist(q, bank).min(1)``.

    The bank's padding (``pad_bank``) is built once, not per chunk, and the clamp and sqrt run on each
    query's minimum instead of the whole (chunk, M) matrix (both monotonic, so the distances are the same
    bits; an index could differ only where two squared distances round to the same root)."""
    padded = pad_bank(bank) if padded is None else padded
    dist, index = [], []
    for start in range(0, len(queries), chunk):
        q = queries[start:start + chunk]
        if max(len(q), len(bank)) <= CDIST_MM_ROWS:
            best = torch.cdist(q, bank).min(dim=1)
            dist.append(best.values)
        else:
            best = squared_distances(q, padded).min(dim=1)
            dist.append(best.values.clamp_min_(0).sqrt_())
        index.append(best.indices)
    return torch.cat(dist), torch.cat(index)


def _generator(seed: int, salt: int) -> torch.Generator:
    """A CPU generator per random choice, so the choices do not depend on each other's order."""
    return torch.Generator().manual_seed(int(seed) * 1000 + salt)


# --------------------------------------------------------------------------------------
# PaDiM
# --------------------------------------------------------------------------------------


class PaDiM:
    """Patch distribution modelling: a Gaussian per layer-1 grid position (see module doc)."""

    def __init__(self, config: PaDiMConfig, trunk: nn.Module | None = None,
                 weights: tuple[str, str] | None = None, device: str = "cpu", batch_size: int = 8,
                 progress: bool = True):
        self.config = config
        self.backbone = _Backbone(build_trunk(config.cnn, config.seed, trunk, weights), device, batch_size, progress)
        self.index: torch.Tensor | None = None  # chosen channels of the layer1-3 concatenation
        self.mean_: torch.Tensor | None = None  # (P, d)
        self.covariance_: torch.Tensor | None = None  # (P, d, d), epsilon included
        self.whiten_: torch.Tensor | None = None  # (P, d, d) inverse Cholesky factor
        self.grid: tuple[int, int] | None = None  # layer-1 grid (h, w)
        self.image_size: tuple[int, int] | None = None

    @property
    def fitted(self) -> bool:
        return self.whiten_ is not None

    def _choose_channels(self, widths: list[int]) -> None:
        total = sum(widths)
        d = self.config.channels
        if d > total:
            raise ValueError(f"PaDiM channels={d} exceeds the {total} channels of layers 1-3 of {self.config.cnn}")
        perm = torch.randperm(total, generator=_generator(self.config.seed, 1))
        self.index = perm[:d].sort().values

    def _embed_batch(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """Stage maps -> chosen channels on the layer-1 grid, (B, d, h, w)."""
        if self.index is None:
            self._choose_channels([f.shape[1] for f in feats])
        grid = feats[0].shape[-2:]
        parts, offset = [], 0
        index = self.index.to(feats[0].device)
        for f in feats:
            mine = index[(index >= offset) & (index < offset + f.shape[1])] - offset
            if len(mine):
                sel = f.index_select(1, mine)  # upsample only the chosen channels
                parts.append(F.interpolate(sel, size=grid, mode="nearest") if sel.shape[-2:] != grid else sel)
            offset += f.shape[1]
        return torch.cat(parts, dim=1)

    @torch.inference_mode()
    def embed(self, images: np.ndarray, desc: str = "PaDiM features") -> torch.Tensor:
        """Images -> (N, d, h, w) float32 embeddings on the layer-1 grid (chooses channels once)."""
        check_images(images)
        out = None
        for start, feats in self.backbone.batches(images, desc):
            e = self._embed_batch(feats)
            if out is None:
                out = torch.empty((len(images), *e.shape[1:]), dtype=torch.float32, device=e.device)
            out[start:start + len(e)] = e
        return out

    @torch.inference_mode()
    def fit(self, images: np.ndarray) -> "PaDiM":
        check_images(images, "training images")
        if len(images) < 2:
            raise ValueError(f"PaDiM needs at least 2 training images for a covariance, got {len(images)}")
        emb = self.embed(images, "PaDiM fit")
        n, d, h, w = emb.shape
        x = emb.flatten(2).permute(2, 0, 1)  # (P, N, d)
        mean = x.mean(dim=1)  # (P, d)
        eye = torch.eye(d, dtype=torch.float64, device=x.device)
        cov = torch.empty((h * w, d, d), dtype=torch.float32, device=x.device)
        whiten = torch.empty_like(cov)
        step = 256  # positions per float64 chunk (256 * d * d * 8 bytes)
        with _one_cpu_thread(x.device):  # batches of small matrices: one thread is faster, same bytes
            for p in range(0, h * w, step):
                c = (x[p:p + step] - mean[p:p + step, None]).double()
                sigma = c.transpose(1, 2) @ c / (n - 1) + self.config.epsilon * eye
                sigma = (sigma + sigma.transpose(1, 2)) / 2  # exactly symmetric
                chol = torch.linalg.cholesky(sigma)
                cov[p:p + step] = sigma.float()
                whiten[p:p + step] = torch.linalg.solve_triangular(chol, eye.expand_as(chol), upper=False).float()
        self.mean_, self.covariance_, self.whiten_ = mean, cov, whiten
        self.grid, self.image_size = (h, w), tuple(images.shape[1:3])
        return self

    @torch.inference_mode()
    def mahalanobis(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(N, d, h, w) or (N, P, d) embeddings -> (N, P) Mahalanobis distances per position."""
        self._require_fit()
        x = embeddings.flatten(2).transpose(1, 2) if embeddings.ndim == 4 else embeddings
        delta = (x.to(self.mean_.device).float() - self.mean_).permute(1, 2, 0)  # (P, d, N)
        with _one_cpu_thread(delta.device):  # P small products: one thread is faster, same bytes
            z = torch.bmm(self.whiten_, delta)  # L^-1 (x - mu)
            return z.norm(dim=1).transpose(0, 1)  # (N, P)

    @torch.inference_mode()
    def score(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Anomaly maps (N, H, W) float32 and image scores (N,) float32 (= max of each map)."""
        self._require_fit()
        check_images(images)
        if tuple(images.shape[1:3]) != self.image_size:
            raise ValueError(f"PaDiM was fitted on {self.image_size} images; got {tuple(images.shape[1:3])}")
        maps = np.empty((len(images), *self.image_size), dtype=np.float32)
        for start, feats in self.backbone.batches(images, "PaDiM score"):
            dist = self.mahalanobis(self._embed_batch(feats)).view(-1, *self.grid)
            maps[start:start + len(dist)] = finish_maps(dist, self.image_size, self.config.sigma)
        return maps, maps.reshape(len(maps), -1).max(axis=1)

    def _require_fit(self) -> None:
        if not self.fitted:
            raise ValueError("PaDiM is not fitted: call fit(healthy_images) before score()")


# --------------------------------------------------------------------------------------
# PatchCore
# --------------------------------------------------------------------------------------


def sparse_projection(dim: int, k: int, seed: int) -> torch.Tensor:
    """A (dim, k) very sparse random projection (Li et al.): +-sqrt(s/k) w.p. 1/(2s), s = sqrt(dim)."""
    g = _generator(seed, 2)
    s = math.sqrt(dim)
    u = torch.rand((dim, k), generator=g)
    signs = torch.where(torch.rand((dim, k), generator=g) < 0.5, -1.0, 1.0)
    return torch.where(u < 1 / s, signs * math.sqrt(s / k), torch.zeros(()))


def project(x: torch.Tensor, matrix: torch.Tensor, chunk: int) -> torch.Tensor:
    """x @ matrix in row chunks."""
    out = torch.empty((len(x), matrix.shape[1]), dtype=torch.float32, device=x.device)
    for start in range(0, len(x), chunk):
        out[start:start + chunk] = x[start:start + chunk] @ matrix
    return out


def coreset_size(n: int, ratio: float) -> int:
    """ceil(ratio * n), at least 1 (rounded first so 0.1 * 61440 gives 6144, not 6145)."""
    return max(1, min(n, math.ceil(round(ratio * n, 9))))


@contextmanager
def _one_cpu_thread(device: torch.device):
    """Run a loop of small CPU ops on one thread, then restore the thread count.

    Each op of these loops (the greedy coreset's steps, PaDiM's per-position
    float64 covariances and whitening) is small: OpenMP's fork/join costs more
    than it gains, and when the cores are shared with another process a
    two-thread op waits for its descheduled partner (measured here: PaDiM's fit
    3 s on one thread, 11-200 s on two while another job ran; the greedy step
    ~30 ms instead of ~0.05 ms). Each matrix of a batched op is computed by one
    thread either way, so the results are the same bytes for any thread count.
    """
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# Error bound of one squared distance by the norm expansion ||x||^2 - 2 x.c + ||c||^2 in float32, relative to
# (2 max ||x||)^2: (k + 2) roundings of at most 2^-24 each (dot products and sums of k terms), times a safety 2.
def _distance_error(k: int, max_norm2: float) -> float:
    return 2 * (k + 2) * 2.0 ** -24 * 4 * max_norm2


@torch.inference_mode()
def greedy_coreset(z: torch.Tensor, size: int, start: int) -> torch.Tensor:
    """Greedy k-center selection on (P, k) features: indices of ``size`` rows, ``start`` first.

    Keeps each row's squared distance ``gap`` to the selection; each step
    selects the farthest row (first of equal ones) and lowers ``gap`` to the
    distance to that new centre (``addmv``: ||x||^2 - 2 x.c, plus ||c||^2,
    clamped at 0) where that is smaller. The features are stored column by
    column (a (P, k) view of a contiguous (k, P) tensor): the CPU's gemv streams
    that layout about 3x faster than rows (1.4 vs 4.5 ms at P = 61,440, k = 128).

    On the CPU most rows are skipped where the triangle inequality proves the
    new centre cannot be nearer than their own (Elkan / accelerated Gonzalez,
    ``_greedy_pruned``); the selection is the same, index for index, as the
    plain loop over all rows (``_greedy_dense``, what other devices run).
    """
    if size < 1 or size > len(z):
        raise ValueError(f"coreset size must be in [1, {len(z)}], got {size}")
    with _one_cpu_thread(z.device):
        if z.device.type == "cpu":
            return _greedy_pruned(z.float(), size, start)
        return _greedy_dense(z, size, start)


def _greedy_dense(z: torch.Tensor, size: int, start: int) -> torch.Tensor:
    """The plain greedy loop: every step updates every row (one gemv over all of ``z``)."""
    cols = z.T.contiguous().T  # same values, column-major
    norms = (z * z).sum(dim=1)
    chosen = torch.empty(size, dtype=torch.long, device=z.device)
    chosen[0] = start
    gap = torch.full_like(norms, float("inf"))  # squared distance to the selection so far
    current = start
    for i in range(1, size):
        d2 = torch.addmv(norms, cols, cols[current], alpha=-2).add_(norms[current]).clamp_min_(0)
        torch.minimum(gap, d2, out=gap)
        gap[current] = 0  # exact zero for selected rows despite rounding
        current = int(torch.argmax(gap))
        chosen[i] = current
    return chosen


def _greedy_pruned(z: torch.Tensor, size: int, start: int, dense_share: float = 0.25) -> torch.Tensor:
    """``_greedy_dense``'s selection, computing only the distances that can lower a row's ``gap``.

    Every row has an *owner*, the centre it is nearest to (its ``gap`` is the
    computed squared distance to it), and each centre an upper bound
    ``radius2`` of its rows' gaps. For a new centre c and a row x owned by a:
    ||x - c|| >= ||c - a|| - ||x - a||, so when that lower bound, squared and
    less the rounding bound ``err`` of a computed squared distance, still
    exceeds gap(x), the dense loop's computed distance would exceed gap(x) too
    and leave it unchanged: the row is skipped. First whole centres are
    tested (with ``radius2``), then the rows of the remaining ones (with their
    own gap). The rows left (about 2 % per step on the MMR patches) get their
    distances from the same gemv on their gathered column-major rows, which
    gives each row the same bits as the gemv over all rows (checked in
    tests/unit/models/test_baselines.py). When more than ``dense_share`` of the
    rows are left (the first steps) the step is the dense one. ~2.5x faster
    than the dense loop at P = 61,440 (5 vs 14 s), the same indices.
    """
    p, k = z.shape
    cols = z.T.contiguous().T
    norms_t = (z * z).sum(dim=1)
    gap = np.full(p, np.inf, dtype=np.float32)
    owner = np.zeros(p, dtype=np.int64)  # the centre (its position in ``chosen``) each row is nearest to
    radius2 = np.zeros(size, dtype=np.float64)  # upper bound of each centre's rows' gaps
    low = np.zeros(size, dtype=np.float64)  # lower bound of the true distance of each centre to the new one
    kept = np.ones(size, dtype=bool)  # centres whose rows may move to the new one
    centres = torch.empty((k, size))  # the centres' features, column-major like ``cols``
    centre_norms = torch.empty(size)
    err = _distance_error(k, float(norms_t.max()))
    chosen = np.empty(size, dtype=np.int64)
    chosen[0] = current = start
    for i in range(1, size):
        j = i - 1  # the new centre ``current`` becomes centre j
        c = cols[current]
        centres[:, j], centre_norms[j] = c, norms_t[current]
        rows = None  # all
        if j > 0:
            dc2 = torch.addmv(centre_norms[:j], centres[:, :j].T, c, alpha=-2).add_(norms_t[current]).numpy()
            np.sqrt(np.maximum(dc2 - err, 0, dtype=np.float64), out=low[:j])
            high = np.sqrt(radius2[:j] + err)  # upper bound of the true distance of a centre's rows to it
            far = (low[:j] > high) & ((low[:j] - high) ** 2 - err > radius2[:j])
            np.logical_not(far, out=kept[:j])
            low[j], kept[j] = 0.0, True
            rows = np.flatnonzero(kept[:i][owner])
            lower, g = low[owner[rows]], gap[rows].astype(np.float64)
            high = np.sqrt(g + err)
            rows = rows[~((lower > high) & ((lower - high) ** 2 - err > g))]
            if len(rows) > dense_share * p:
                rows = None
        if rows is None:
            d2 = torch.addmv(norms_t, cols, c, alpha=-2).add_(norms_t[current]).clamp_min_(0).numpy()
            moved = np.flatnonzero(d2 < gap)
            nearer = d2[moved]
        else:
            index = torch.from_numpy(rows)
            block = torch.index_select(z, 0, index).T.contiguous().T  # the rows, column-major
            d2 = torch.addmv(norms_t[index], block, c, alpha=-2).add_(norms_t[current]).clamp_min_(0).numpy()
            closer = d2 < gap[rows]
            moved, nearer = rows[closer], d2[closer]
        gap[moved] = nearer
        owner[moved] = j
        radius2[j] = float(nearer.max()) if len(nearer) else 0.0
        gap[current] = 0  # exact zero for selected rows despite rounding
        owner[current] = j
        current = int(gap.argmax())
        chosen[i] = current
    return torch.from_numpy(chosen).to(z.device)


@torch.inference_mode()
def covering_radius(z: torch.Tensor, centres: torch.Tensor, chunk: int = 4096) -> float:
    """max over rows of the distance to the nearest centre (the k-center objective)."""
    return float(nearest(z, z[centres], chunk)[0].max())


class PatchCore:
    """Nearest-neighbour search against a coreset memory bank of patch features (see module doc)."""

    def __init__(self, config: PatchCoreConfig, trunk: nn.Module | None = None,
                 weights: tuple[str, str] | None = None, device: str = "cpu", batch_size: int = 8,
                 progress: bool = True):
        self.config = config
        self.backbone = _Backbone(build_trunk(config.cnn, config.seed, trunk, weights), device, batch_size, progress)
        self.feature_projection: torch.Tensor | None = None  # (D_full, feature_dim) when asked
        self.memory_bank: torch.Tensor | None = None  # (M, D)
        self.coreset_index: torch.Tensor | None = None  # rows of the training patches kept
        self.n_train_patches = 0

    @property
    def fitted(self) -> bool:
        return self.memory_bank is not None

    def _patches(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """Stage maps -> (B, h2, w2, D) locally aware patch features on the layer-2 grid."""
        f2, f3 = (F.avg_pool2d(f, 3, stride=1, padding=1) for f in feats[1:3])
        f3 = F.interpolate(f3, size=f2.shape[-2:], mode="bilinear", align_corners=False)
        x = torch.cat([f2, f3], dim=1).permute(0, 2, 3, 1)
        if self.config.feature_dim is not None:
            if self.feature_projection is None:
                g = _generator(self.config.seed, 3)
                m = torch.randn((x.shape[-1], self.config.feature_dim), generator=g)
                self.feature_projection = (m / math.sqrt(self.config.feature_dim)).to(x.device)
            x = x @ self.feature_projection
        return x.contiguous()

    @torch.inference_mode()
    def features(self, images: np.ndarray, desc: str = "PatchCore features") -> torch.Tensor:
        """Images -> (N * h2 * w2, D) patch features, preallocated (no list + cat copy)."""
        check_images(images)
        out = None
        for start, feats in self.backbone.batches(images, desc):
            x = self._patches(feats)
            per_image = x.shape[1] * x.shape[2]
            if out is None:
                out = torch.empty((len(images) * per_image, x.shape[-1]), dtype=torch.float32, device=x.device)
            out[start * per_image:(start + len(x)) * per_image] = x.reshape(-1, x.shape[-1])
        return out

    @torch.inference_mode()
    def selection_features(self, patches: torch.Tensor) -> torch.Tensor:
        """The sparse random projection (to projection_dim) on which the coreset is selected."""
        matrix = sparse_projection(patches.shape[1], self.config.projection_dim, self.config.seed)
        return project(patches, matrix.to(patches.device), self.config.chunk)

    @torch.inference_mode()
    def fit(self, images: np.ndarray) -> "PatchCore":
        check_images(images, "training images")
        patches = self.features(images, "PatchCore fit")
        z = self.selection_features(patches)
        size = coreset_size(len(patches), self.config.coreset_ratio)
        start = int(torch.randint(len(patches), (1,), generator=_generator(self.config.seed, 4)))
        self.coreset_index = greedy_coreset(z, size, start)
        del z
        self.memory_bank = patches[self.coreset_index]  # indexing copies: the patches can go
        self.n_train_patches = len(patches)
        return self

    def _image_score(self, patch_dist: torch.Tensor, patch_index: torch.Tensor, queries: torch.Tensor,
                     padded: torch.Tensor | None = None) -> float:
        """PatchCore Eq. 7: s* reweighted by 1 - softmax of distances to N_b(m*), at m*."""
        worst = int(torch.argmax(patch_dist))
        s_star = patch_dist[worst]
        bank = self.memory_bank
        m_star = bank[patch_index[worst]]
        b = min(self.config.neighbours, len(bank))
        # N_b(m*): the b bank features nearest to m* (m* itself first, at distance 0).
        hood = distances(m_star[None], bank, padded)[0].topk(b, largest=False).indices
        hood = torch.cat([patch_index[worst:worst + 1], hood[hood != patch_index[worst]][: b - 1]])
        d = torch.cdist(queries[worst][None], bank[hood])[0]
        weight = 1 - torch.softmax(d, dim=0)[0]
        return float(weight * s_star)

    @torch.inference_mode()
    def score(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Anomaly maps (N, H, W) float32 and reweighted image scores (N,) float32."""
        if not self.fitted:
            raise ValueError("PatchCore is not fitted: call fit(healthy_images) before score()")
        check_images(images)
        size = tuple(images.shape[1:3])
        maps = np.empty((len(images), *size), dtype=np.float32)
        scores = np.empty(len(images), dtype=np.float32)
        padded = pad_bank(self.memory_bank)  # once for all batches (torch.cdist builds it per call)
        for start, feats in self.backbone.batches(images, "PatchCore score"):
            x = self._patches(feats)
            b, h, w, dim = x.shape
            flat = x.reshape(-1, dim)
            dist, index = nearest(flat, self.memory_bank, self.config.chunk, padded)
            dist, index, flat = dist.view(b, -1), index.view(b, -1), flat.view(b, h * w, dim)
            for i in range(b):
                scores[start + i] = self._image_score(dist[i], index[i], flat[i], padded)
            maps[start:start + b] = finish_maps(dist.view(b, h, w), size, self.config.sigma)
        return maps, scores
