"""Fine-tuning MMRAD on healthy pairs with simulated anomalies (paper Sec. 4.3-4.4).

Each step takes ``batch_size`` healthy cases, simulates an anomaly in each
modality independently (``mmrad.training.anomaly_simulation``), and minimises Eq. 8-10:
``CE(M_fundus, B_fundus) + CE(M_oct, B_oct) + CE(S, max(B_fundus, B_oct))``
(focal or dice for the maps as options, Table 10).

Determinism and exact resume: the batch of step ``k`` (which cases, which
simulated anomalies) is a pure function of ``(seed, k)``, and the model's
frozen parts are rebuilt from the same seed, so a run interrupted after a
checkpoint and resumed with ``resume=True`` ends with the same weights as an
uninterrupted run (on the CPU; CUDA kernels may differ in the last bits).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss
from tqdm import tqdm

from mmrad.core.errors import DataError
from mmrad.core.outputs import atomic_dir, check_output_folder
from mmrad.core.params import Params, check_batch_size
from mmrad.data.splits import load_training_images
from mmrad.data.symptoms import MODALITIES
from mmrad.models.builder import MODEL_FILE, RANDOM_INIT, build_model, save_atomic, save_finetuned
from mmrad.training import distributed
from mmrad.training.anomaly_simulation import simulate, simulation_config

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
# Progress lines per run in the log (and so in the stage's Prefect flow run, where the terminal's progress bar
# does not reach): step, loss, speed and time left, about every tenth of the steps.
PROGRESS_LINES = 10


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> np.ndarray:
    """Cases of one step: each epoch visits every case once, in a seeded order."""
    per_epoch = math.ceil(n / batch_size)
    epoch, position = divmod(step, per_epoch)
    order = np.random.default_rng([seed, 1, epoch]).permutation(n)
    chunk = order[position * batch_size:(position + 1) * batch_size]
    if len(chunk) < batch_size:  # last, short batch of the epoch: top up from the start
        chunk = np.concatenate([chunk, order[: batch_size - len(chunk)]])
    return chunk


PAIR_PATTERNS = {"fundus_only": ("fundus",), "oct_only": ("oct",), "both": ("fundus", "oct")}


def pair_pattern(section, step: int, position: int, seed: int) -> tuple[str, ...] | None:
    """Which modalities of case ``position`` of step ``step`` get a simulated anomaly.

    ``pairing: independent`` returns None: each image draws pi on its own (the
    per-image reading of Sec. 4.3.1; with pi = 0.7, 91 % of pairs are
    positive). ``pairing: pair`` draws pi once per pair (a share 1 - pi of the
    pairs stays normal), then the pattern from ``pair_shares`` (fundus only,
    OCT only, both): the detection label then has both classes in a fair
    share, and pairs anomalous in one modality only teach the fusion token
    to look at both (docs/decisions.md).
    """
    if section.pairing == "independent":
        return None
    rng = np.random.default_rng([seed, 3, step, position])
    if rng.random() >= section.probability:
        return ()
    shares = section.pair_shares.model_dump()
    names = list(PAIR_PATTERNS)
    weights = np.array([shares[name] for name in names], dtype=np.float64)
    return PAIR_PATTERNS[names[int(rng.choice(len(names), p=weights / weights.sum()))]]


def make_batch(images: dict[str, np.ndarray], step: int, params: Params,
               positions: range | None = None) -> dict[str, torch.Tensor]:
    """Images, simulated masks and case labels of one step (a pure function of seed and step).

    ``positions``: the part of the step's global batch to build (a training
    process's shard); case j is the same case with the same anomaly whichever
    process builds it.
    """
    config = simulation_config(params.simulation)
    n = len(next(iter(images.values())))
    idx = batch_indices(n, params.train.batch_size, step, params.seed)
    batch: dict[str, list] = {key: [] for m in images for key in (m, f"{m}_mask")}
    for j in positions if positions is not None else range(len(idx)):
        case = idx[j]
        pattern = pair_pattern(params.simulation, step, j, params.seed) if len(images) == 2 else None
        for modality, stack in images.items():
            k = MODALITIES.index(modality)  # the stream of a modality is the same paired or alone
            rng = np.random.default_rng([params.seed, 2, step, j, k])
            anomalous = None if pattern is None else modality in pattern
            image, mask = simulate(stack[case], modality, config, rng, anomalous=anomalous)
            batch[modality].append(image)
            batch[f"{modality}_mask"].append(mask)
    tensors = {key: torch.from_numpy(np.stack(value)) for key, value in batch.items()}
    for modality in images:
        tensors[modality] = tensors[modality].permute(0, 3, 1, 2).float()
        tensors[f"{modality}_mask"] = tensors[f"{modality}_mask"].float()
    tensors["label"] = torch.stack([tensors[f"{m}_mask"].flatten(1).amax(1) for m in images]).amax(0)
    return tensors


def map_loss(logits: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "ce":
        return F.binary_cross_entropy_with_logits(logits, target)
    if kind == "focal":
        return sigmoid_focal_loss(logits, target, alpha=0.25, gamma=2.0, reduction="mean")
    if kind == "lovasz":
        return lovasz_hinge(logits, target)
    probs = torch.sigmoid(logits).flatten(1)  # dice, per image, smoothed so empty masks are fine
    target = target.flatten(1)
    dice = (2 * (probs * target).sum(1) + 1) / (probs.sum(1) + target.sum(1) + 1)
    return (1 - dice).mean()


def lovasz_hinge(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Berman et al.'s Lovasz hinge (Table 10), per image, averaged: the Lovasz extension of the Jaccard loss
    applied to the hinge errors ``1 - logit * (2 y - 1)`` (sorted, descending). Where the errors are 0 / 1 it
    equals the Jaccard loss of the mispredicted pixels (tested); an image without a lesion is penalised for
    its largest error only."""
    per_image = []
    for scores, labels in zip(logits.flatten(1), target.flatten(1)):
        errors, order = torch.sort(1 - scores * (2 * labels - 1), descending=True)
        labels = labels[order]
        positives = labels.sum()
        jaccard = 1 - (positives - labels.cumsum(0)) / (positives + (1 - labels).cumsum(0))
        gradient = torch.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]])
        per_image.append(torch.dot(F.relu(errors), gradient))
    return torch.stack(per_image).mean()


def losses(out: dict, batch: dict, kind: str) -> dict[str, torch.Tensor]:
    """Eq. 8-10: localisation on every map + detection on the fused score.

    With one modality (Fig. 5b) there is no fusion: localisation loss only.
    """
    modalities = [m for m in MODALITIES if m in out]
    parts = {m: map_loss(out[m].float(), batch[f"{m}_mask"], kind) for m in modalities}
    loss = sum(parts.values())
    if len(modalities) == 2:
        parts["score"] = F.binary_cross_entropy_with_logits(out["score"].float(), batch["label"])
        loss = loss + parts["score"]
    parts["loss"] = loss
    return parts


def training_fingerprint(params: Params) -> str:
    """What a checkpoint must match to be resumed: everything that shapes the run (stored in the checkpoint and
    the model file as ``params_hash``; not ``mmrad.ops.tracking.params_hash``, which hashes all of params.yaml)."""
    relevant = {k: params.model_dump(mode="json")[k] for k in ("seed", "model", "weights", "simulation", "train")}
    relevant["train"].pop("processes")  # the same run on 1 or N processes (mmrad.training.distributed)
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def parameter_groups(model, lr: float, head_lr_scale: float) -> list[dict]:
    """AdamW groups: the fusion head (and its input normalisation) at ``lr * head_lr_scale``, the rest at ``lr``.

    The head is a small MLP trained from scratch on a 1-dimensional target; at the decoder's learning rate it
    barely leaves its initial output in the CPU profile's few steps (docs/decisions.md, measured there).
    """
    head = {id(p) for module in (model.fusion_head, model.fusion_norm) for p in module.parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if id(p) not in head], "lr": lr},
              {"params": [p for p in trainable if id(p) in head], "lr": lr * head_lr_scale}]
    return [g for g in groups if g["params"]]


def _count_labels(balance: dict, batch: dict, modalities: list[str]) -> None:
    """Add one batch to the running label counts: samples, positives per modality and, for pairs, per pattern."""
    flags = {m: batch[f"{m}_mask"].flatten(1).amax(1).bool().cpu() for m in modalities}
    n = len(next(iter(flags.values())))
    balance["samples"] = balance.get("samples", 0) + n
    for m, f in flags.items():
        balance[f"{m}_anomalous"] = balance.get(f"{m}_anomalous", 0) + int(f.sum())
    if len(modalities) == 2:
        a, b = flags[modalities[0]], flags[modalities[1]]
        for name, f in (("normal_pairs", ~a & ~b), (f"{modalities[0]}_only", a & ~b), (f"{modalities[1]}_only", ~a & b),
                        ("both", a & b)):
            balance[name] = balance.get(name, 0) + int(f.sum())


def training_modalities(images: dict[str, np.ndarray], chosen: list[str], manifest: Path) -> dict[str, np.ndarray]:
    """The modalities of ``train.modalities`` the dataset has (Table 6: one modality of a paired dataset trains
    a single-modal model); a single-modal dataset keeps its one modality when it is among them."""
    kept = {m: v for m, v in images.items() if m in chosen}
    if not kept:
        raise DataError(manifest, "train.modalities names no modality of this dataset",
                        f"train.modalities {chosen}, the dataset has {list(images)}")
    return kept


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise DataError("params.yaml", "train.device is 'cuda' but no CUDA device is available")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


def progress_line(step: int, steps: int, loss: float, done: int, seconds: float) -> str:
    """``step 30/300 (10 %): loss 0.4123, 1.52 steps/s, about 2 min 58 s left`` (``done`` steps in ``seconds``)."""
    rate = done / seconds if seconds > 0 else float("inf")
    left = (steps - step) / rate if rate > 0 else float("inf")
    minutes, secs = divmod(round(left), 60) if math.isfinite(left) else (0, 0)
    eta = f"{minutes} min {secs} s" if minutes else f"{secs} s"
    return f"step {step}/{steps} ({100 * step // steps} %): loss {loss:.4f}, {rate:.2f} steps/s, about {eta} left"


CHECKPOINT_KEYS = ("step", "trainable", "optimizer", "history", "params_hash")


def read_checkpoint(path: Path, device) -> dict:
    """A resumable checkpoint, or a one-line error naming it and how to start over (truncated, not ours)."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # truncated or not a torch file
        raise DataError(path, "checkpoint is unreadable (truncated or not a training checkpoint)",
                        f"{type(exc).__name__}; start over by running without --resume, or delete the file") from exc
    if not isinstance(state, dict) or any(k not in state for k in CHECKPOINT_KEYS):
        raise DataError(path, "not a training checkpoint of mmrad",
                        "start over by running without --resume, or delete the file")
    return state


def train(params: Params, prepared: str | Path, out: str | Path, checkpoint_dir: str | Path,
          resume: bool = False, stop_after: int | None = None, progress: bool | None = None) -> dict:
    """Fine-tune and write ``out/model.pt`` (trainable weights only) and ``out/metrics.json``.

    ``checkpoint_dir`` holds the resumable ``checkpoint.pt`` (every
    ``train.checkpoint_every`` steps). ``stop_after`` ends early after that
    many steps (for tests and for splitting a long run), leaving a checkpoint.
    Launched by torchrun as one of N processes, it trains data-parallel
    (mmrad.training.distributed); only rank 0 writes files.
    """
    t = params.train
    if t.threads:
        torch.set_num_threads(t.threads)
    context, device = distributed.start(resolve_device(t.device))
    positions = distributed.shard(t.batch_size, context)
    out, checkpoint_dir = Path(out), Path(checkpoint_dir)
    check_output_folder(out, [prepared, checkpoint_dir])  # before the work, not after it
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    images, case_ids = load_training_images(prepared)
    images = training_modalities(images, t.modalities, Path(prepared) / "manifest.parquet")
    check_batch_size(params, len(case_ids), Path(prepared) / "manifest.parquet")
    model, identity = build_model(params)
    model.to(device).train()
    counts = model.parameter_counts()
    log.info("training on %s%s: %d healthy cases (%s), trainable %s / frozen %s parameters", device,
             f" x {context.world} processes" if context.active else "", len(case_ids), " + ".join(images),
             f"{counts['trainable']:,}", f"{counts['frozen']:,}")
    net = model
    if context.active:  # gradients all-reduced across processes; a single-modal model has no fusion head in use
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None, broadcast_buffers=False,
            find_unused_parameters=len(images) == 1)
    optimiser = torch.optim.AdamW(parameter_groups(model, t.lr, t.head_lr_scale), lr=t.lr, betas=tuple(t.betas),
                                  weight_decay=t.weight_decay)

    start, history, balance = 0, [], {}
    checkpoint_path = checkpoint_dir / CHECKPOINT
    if resume:
        if not checkpoint_path.is_file():
            raise DataError(checkpoint_path, "no checkpoint to resume from")
        state = read_checkpoint(checkpoint_path, device)
        if state["params_hash"] != training_fingerprint(params):
            raise DataError(checkpoint_path, "checkpoint was made with other parameters; cannot resume")
        model.load_state_dict(state["trainable"], strict=False)
        optimiser.load_state_dict(state["optimizer"])
        start, history, balance = state["step"], state["history"], state.get("balance", {})
        log.info("resumed from step %d", start)

    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast(
        "cpu", enabled=False)
    end = t.steps if stop_after is None else min(t.steps, start + stop_after)
    started = time.perf_counter()
    bar = tqdm(range(start, end), initial=start, total=t.steps, desc="train", unit="step",
               disable=not context.is_main or (None if progress is None else not progress))
    for step in bar:
        batch = {k: v.to(device) for k, v in make_batch(images, step, params, positions).items()}
        _count_labels(balance, batch, list(images))
        with autocast:
            out_ = net(**{m: batch[m] for m in images})
        parts = losses(out_, batch, t.loss)
        optimiser.zero_grad(set_to_none=True)
        parts["loss"].backward()
        optimiser.step()
        values = distributed.mean_across({k: float(v.detach()) for k, v in parts.items()}, context)
        record = {"step": step + 1, **{k: round(v, 6) for k, v in values.items()}}
        history.append(record)
        bar.set_postfix(loss=f"{record['loss']:.4f}")
        if context.is_main and ((step + 1) % max(1, t.steps // PROGRESS_LINES) == 0 or step + 1 == end):
            log.info("%s", progress_line(step + 1, t.steps, record["loss"], step + 1 - start,
                                         time.perf_counter() - started))
        if context.is_main and ((step + 1) % t.checkpoint_every == 0 or step + 1 == end):
            save_atomic({"step": step + 1, "trainable": model.trainable_state_dict(),
                          "optimizer": optimiser.state_dict(), "history": history, "balance": balance,
                          "params_hash": training_fingerprint(params)}, checkpoint_path)
    bar.close()
    seconds = time.perf_counter() - started
    if end < t.steps:
        log.info("stopped after step %d of %d; resume with --resume", end, t.steps)
        distributed.stop(context)
        return {"step": end, "finished": False}
    if not context.is_main:
        distributed.stop(context)
        return {"step": end, "finished": True, "rank": context.rank}

    window = min(10, len(history))
    metrics = {
        "steps": t.steps, "device": device.type, "processes": context.world, "seconds": round(seconds, 1),
        "modalities": list(images),
        "first_loss": round(float(np.mean([h["loss"] for h in history[:window]])), 5),
        "final_loss": round(float(np.mean([h["loss"] for h in history[-window:]])), 5),
        "labels": balance,  # what the simulation fed the model (this process's share when data-parallel)
        "trainable_parameters": counts["trainable"], "frozen_parameters": counts["frozen"],
        "pretrained": identity["sam"] != RANDOM_INIT, "weights": identity,
    }
    columns = ["loss", *images, *(["score"] if len(images) == 2 else [])]
    lines = ["step\t" + "\t".join(columns)] + [
        f"{h['step']}\t" + "\t".join(str(h[c]) for c in columns) for h in history]
    with atomic_dir(out, [prepared, checkpoint_dir]) as tmp:  # model, metrics and loss appear together
        save_finetuned(tmp / MODEL_FILE, model, identity, params, training_fingerprint(params))
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        (tmp / "loss.tsv").write_text("\n".join(lines) + "\n")
    log.info("trained %d steps in %.1f s: loss %.4f -> %.4f", t.steps, seconds, metrics["first_loss"],
             metrics["final_loss"])
    distributed.stop(context)
    return metrics
