"""The one inference path: MMRAD's probabilities from uint8 images.

``infer`` is one forward pass (what the MLflow model serves); ``predict_mmrad``
scores a whole split in batches: the paired maps and fusion score, and each
modality alone (the map maximum, Fig. 5). The evaluate stage, ``mmrad predict``
and the served model all compute ``MMRAD.forward``'s numbers, so a case scores
the same everywhere.

For a pair, ``predict_mmrad`` does not run three forward passes (the pair, then
each image alone): the image embeddings (the CNNs and the encoder, nearly all
the cost) do not depend on the other modality, so ``paired_and_single`` embeds
each image once and only re-runs the cheap decoder for the modality that
``fusion_order`` visits second (alone, it starts from the untouched fusion
token). The first modality's single-modal map *is* its paired map. The
results are the same bytes as ``infer`` on the pair and on each image
(tests/unit/evaluation/test_scorers_inference.py checks it against
``MMRAD.forward``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from mmrad.data.splits import SplitData
from mmrad.models.mmrad import MMRAD


@dataclass
class Predictions:
    maps: dict[str, np.ndarray]  # modality -> (N, S, S) float32 anomaly probability
    scores: dict[str, np.ndarray]  # score name -> (N,) case scores
    embeddings: dict[str, np.ndarray] = field(default_factory=dict)  # modality -> (N, D) pooled, MMRAD only


@torch.inference_mode()
def infer(model: MMRAD, images: dict[str, np.ndarray], pooled: bool = False) -> dict[str, np.ndarray]:
    """One forward pass on {modality: (B, S, S, 3) uint8}: {modality: (B, S, S) map probability,
    "score": (B,) case probability (the fusion token for a pair, the map maximum for one image)}, and with
    ``pooled`` {"<modality>_pooled": (B, 256) embedding}."""
    device = next(model.parameters()).device
    batch = {m: torch.from_numpy(np.ascontiguousarray(v)).permute(0, 3, 1, 2).float().to(device)
             for m, v in images.items()}
    out = model(**batch, pooled=pooled)
    result = {m: torch.sigmoid(out[m]).float().cpu().numpy() for m in images}
    result["score"] = torch.sigmoid(out["score"]).float().cpu().numpy()
    if pooled:
        result.update({f"{m}_pooled": out[f"{m}_pooled"].float().cpu().numpy() for m in images})
    return result


@torch.inference_mode()
def paired_and_single(model: MMRAD, images: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``infer(model, images, pooled=True)`` for a pair, plus ``"<modality>_only"``: ``infer(model,
    {modality: ...})["score"]`` for each image, from one embedding per image (see the module doc)."""
    device = next(model.parameters()).device
    batch = {m: torch.from_numpy(np.ascontiguousarray(v)).permute(0, 3, 1, 2).float().to(device)
             for m, v in images.items()}
    order = [m for m in model.config.fusion_order if m in batch]
    if len(order) != 2 or len(batch) != 2:
        raise ValueError(f"paired_and_single needs both modalities of fusion_order, got {sorted(batch)}")
    fresh = model.fusion_token.expand(batch[order[0]].shape[0], 1, -1)
    fusion = fresh
    result: dict[str, np.ndarray] = {}
    maps: dict[str, torch.Tensor] = {}
    for i, m in enumerate(order):  # MMRAD.forward's loop: T_f carries over from the first to the second
        embedding = model.embed(batch[m])
        logits, fusion = model.decode(embedding, fusion, m)
        maps[m] = logits
        alone = logits if i == 0 else model.decode(embedding, fresh, m)[0]  # forward(m only): the fresh T_f
        result[m] = torch.sigmoid(logits).float().cpu().numpy()
        result[f"{m}_pooled"] = embedding.mean(dim=(2, 3)).float().cpu().numpy()
        result[f"{m}_only"] = torch.sigmoid(alone.flatten(1).amax(dim=1)).float().cpu().numpy()
    result["score"] = torch.sigmoid(model.fused_score(fusion, maps)).float().cpu().numpy()
    return result


def predict_mmrad(model: MMRAD, data: SplitData, batch_size: int = 8) -> Predictions:
    """Paired maps and fusion score, plus single-modal scores (the map maximum), per case."""
    model.eval()
    modalities = list(data.images)
    maps: dict[str, list] = {m: [] for m in modalities}
    pooled: dict[str, list] = {m: [] for m in modalities}
    scores: dict[str, list] = {"fusion": [], **{f"{m}_only": [] for m in modalities}}
    for start in range(0, len(data.case_ids), batch_size):
        batch = {m: data.images[m][start:start + batch_size] for m in modalities}
        if len(modalities) == 2:
            out = paired_and_single(model, batch)
            scores["fusion"].append(out["score"])
        else:
            out = infer(model, batch, pooled=True)
            out[f"{modalities[0]}_only"] = out["score"]
        for m in modalities:
            maps[m].append(out[m])
            pooled[m].append(out[f"{m}_pooled"])
            scores[f"{m}_only"].append(out[f"{m}_only"])
    result = Predictions({m: np.concatenate(v) for m, v in maps.items()},
                         {k: np.concatenate(v) for k, v in scores.items() if v},
                         {m: np.concatenate(v) for m, v in pooled.items()})
    return with_combined_scores(result)


def with_combined_scores(predictions: Predictions) -> Predictions:
    """Add the max / mean of the per-modality image scores (Table 12; the baselines' detection score)."""
    singles = [v for k, v in predictions.scores.items() if k.endswith("_only")]
    if len(singles) == 2:
        predictions.scores["max"] = np.maximum(*singles)
        predictions.scores["mean"] = (singles[0] + singles[1]) / 2
    return predictions
