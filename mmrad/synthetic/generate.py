"""The embedded default dataset: retina phantoms written in the real MMR, IDRiD and RESC layouts.

No machine here can download the real data, so ``generate`` renders
synthetic eyes (``mmrad.synthetic.phantom``) and writes them with the same writers and
in the same folder layouts as the real releases; everything downstream reads
them with the readers a real download goes through.

Every image has its own seed, derived from ``params.seed``, the dataset and
the image's index, so the output is byte-identical for the same params, and
images can be rendered in any order or in parallel.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from mmrad.core.outputs import atomic_dir
from mmrad.core.params import Params
from mmrad.core.processes import process_pool
from mmrad.data import symptoms
from mmrad.data.datasets import idrid, mmr, resc
from mmrad.synthetic.phantom.eye import Eye, Rendered
from mmrad.synthetic.phantom.fundus import render_fundus
from mmrad.synthetic.phantom.oct import render_oct

log = logging.getLogger(__name__)

FOLDERS = {"mmr": "MMR", "idrid": "IDRiD", "resc": "RESC"}
_DATASET_CODE = {"mmr": 1, "idrid": 2, "resc": 3}

# How often each symptom appears in a synthetic anomalous case (independent
# draws, at least one symptom per anomalous image). Rough clinical frequencies
# in retinal artery occlusion; they shape the default data, not the method.
MMR_FUNDUS_FREQUENCY = {1: 0.8, 2: 0.5, 3: 0.3, 4: 0.3, 5: 0.3, 6: 0.2, 7: 0.2, 8: 0.1, 9: 0.15}
MMR_OCT_FREQUENCY = {1: 0.6, 2: 0.4, 3: 0.2, 4: 0.3, 5: 0.3, 6: 0.3, 7: 0.2, 8: 0.3}
IDRID_FREQUENCY = {1: 1.0, 2: 0.95, 3: 0.95, 4: 0.5}  # as in part A's mask counts
RESC_FREQUENCY = {1: 0.9, 2: 0.4, 3: 0.3}


@dataclass(frozen=True)
class Job:
    """One synthetic case (MMR) or image (IDRiD, RESC) to render and write."""

    dataset: str
    index: int
    split: str
    label: int
    name: str
    seed: int
    extra: tuple = ()  # IDRiD grading: (grade, edema risk)


def _seed(base: int, dataset: str, index: int) -> int:
    return int(np.random.SeedSequence([base, _DATASET_CODE[dataset], index]).generate_state(1)[0])


def _draw(rng: np.random.Generator, frequency: dict[int, float]) -> list[int]:
    """Independent draws per class, at least one class."""
    chosen = [c for c, p in frequency.items() if rng.random() < p]
    return chosen or [int(rng.choice(list(frequency)))]


def plan(params: Params) -> list[Job]:
    """Every image of the default dataset, in a fixed order."""
    s = params.synthetic
    jobs: list[Job] = []

    def add(dataset, split, label, name, extra=()):
        index = sum(1 for j in jobs if j.dataset == dataset)
        jobs.append(Job(dataset, index, split, label, name, _seed(params.seed, dataset, index), extra))

    groups = (("train", 0, s.mmr.train_normal), ("test", 0, s.mmr.test_normal), ("test", 1, s.mmr.test_anomalous))
    for split, label, count in groups:
        for i in range(count):
            add("mmr", split, label, f"{split}_{'anomaly' if label else 'normal'}_{i + 1:04d}")

    digits = max(2, len(str(s.idrid.seg_train + s.idrid.seg_test)))
    for i in range(s.idrid.seg_train + s.idrid.seg_test):
        split = "train" if i < s.idrid.seg_train else "test"  # the official part-A sets
        add("idrid", split, 1, f"IDRiD_{i + 1:0{digits}d}")
    for split, count in (("train", s.idrid.grading_train), ("test", s.idrid.grading_test)):
        grade_rng = np.random.default_rng([params.seed, _DATASET_CODE["idrid"], 1000 + len(split)])
        for i in range(count):  # numbering restarts per set, as in the real part B
            healthy = grade_rng.random() < s.idrid.healthy_fraction
            grade = 0 if healthy else int(grade_rng.integers(1, 5))
            edema = 0 if grade == 0 else int(grade_rng.integers(0, 3))
            add("idrid", split, int(grade > 0), f"IDRiD_{i + 1:03d}", ("grading", grade, edema))

    for split, label, count in (("train", 0, s.resc.train_good), ("val", 0, s.resc.val_good),
                                ("val", 1, s.resc.val_ungood), ("test", 0, s.resc.test_good),
                                ("test", 1, s.resc.test_ungood)):
        for i in range(count):
            add("resc", split, label, f"{split}_{'ungood' if label else 'good'}_{i + 1:04d}")
    return jobs


def _kinds(table: dict[int, symptoms.Symptom], ids: list[int]) -> list[str]:
    return [table[i].kind for i in ids]


def _by_class(table: dict[int, symptoms.Symptom], ids: list[int], lesions: dict[str, np.ndarray]):
    return {i: lesions[table[i].kind] for i in ids}


def _render_mmr(render, eye: Eye, size, kinds: list[str], style: str, difficulty) -> Rendered:
    """One MMR image at the benchmark's lesion difficulty (``synthetic.mmr.lesions.<modality>``).

    ``size`` scales each lesion's target area inside the renderer; ``contrast``
    scales the lesions' change of the image: healthy + contrast x (lesioned -
    healthy), computed from the same eye rendered without lesions (the healthy
    draws do not depend on the lesions, so only the lesions' pixels move). Both
    1.0 render the phantom as it is. The masks stay the lesions' own.
    """
    rendered = render(eye, size, kinds, style=style, area_scale=difficulty.size)
    if not kinds or difficulty.contrast == 1.0:
        return rendered
    healthy = render(eye, size, (), style=style).image.astype(np.float32)
    change = rendered.image.astype(np.float32) - healthy
    image = np.clip(np.rint(healthy + np.float32(difficulty.contrast) * change), 0, 255).astype(np.uint8)
    return Rendered(image=image, lesions=rendered.lesions, anatomy=rendered.anatomy)


def render_job(job: Job, root: Path, params: Params) -> None:
    """Render one job and write it under ``root`` with the dataset's own writer."""
    eye = Eye.sample(job.seed)
    rng = np.random.default_rng([job.seed, 99])  # which symptoms this case shows
    s = params.synthetic
    if job.dataset == "mmr":
        fundus_ids = _draw(rng, MMR_FUNDUS_FREQUENCY) if job.label else []
        oct_ids = _draw(rng, MMR_OCT_FREQUENCY) if job.label else []
        if job.label and rng.random() < s.mmr.one_modality_fraction:
            (fundus_ids if rng.random() < 0.5 else oct_ids).clear()  # visible in one modality only
        fundus = _render_mmr(render_fundus, eye, s.mmr.fundus_size, _kinds(symptoms.MMR_FUNDUS, fundus_ids),
                             "visucam", s.mmr.lesions.fundus)
        oct_ = _render_mmr(render_oct, eye, s.mmr.oct_size, _kinds(symptoms.MMR_OCT, oct_ids),
                           "spectralis", s.mmr.lesions.oct)
        mmr.write_case(root / FOLDERS["mmr"], job.split, job.label, job.name,
                       {symptoms.FUNDUS: fundus.image, symptoms.OCT: oct_.image},
                       {symptoms.FUNDUS: _by_class(symptoms.MMR_FUNDUS, fundus_ids, fundus.lesions),
                        symptoms.OCT: _by_class(symptoms.MMR_OCT, oct_ids, oct_.lesions)})
    elif job.dataset == "idrid" and job.extra:  # part B, disease grading
        _, grade, _ = job.extra
        ids = [] if grade == 0 else _draw(rng, {1: 0.9, 2: 0.2 * grade, 3: 0.2 * grade, 4: 0.1 * grade})
        fundus = render_fundus(eye, s.idrid.size, _kinds(symptoms.IDRID_LESIONS, ids), style="idrid")
        idrid.write_grading_image(root / FOLDERS["idrid"], job.split, job.name, fundus.image)
    elif job.dataset == "idrid":  # part A, lesion segmentation
        ids = _draw(rng, IDRID_FREQUENCY)
        fundus = render_fundus(eye, s.idrid.size, _kinds(symptoms.IDRID_LESIONS, ids), style="idrid")
        idrid.write_segmentation_image(root / FOLDERS["idrid"], job.split, job.name, fundus.image,
                                       _by_class(symptoms.IDRID_LESIONS, ids, fundus.lesions),
                                       fundus.anatomy["optic_disc"])
    else:
        ids = _draw(rng, RESC_FREQUENCY) if job.label else []
        scan = render_oct(eye, s.resc.size, _kinds(symptoms.RESC_LESIONS, ids), style="cirrus")
        resc.write_image_pair(root / FOLDERS["resc"], job.split, job.label, job.name, scan.image,
                              _by_class(symptoms.RESC_LESIONS, ids, scan.lesions))


def _render_star(args):
    render_job(*args)


def generate(params: Params, out: str | Path, progress: bool | None = None) -> dict[str, int]:
    """Write the whole synthetic dataset to ``out`` (atomically) and return image counts."""
    out = Path(out)
    jobs = plan(params)
    with atomic_dir(out) as tmp:
        work = [(job, tmp, params) for job in jobs]
        bar = tqdm(total=len(jobs), desc="generate", unit="case", disable=None if progress is None else not progress)
        for _ in process_pool(params.synthetic.workers, chunksize=4)(_render_star, work):
            bar.update()
        bar.close()
        for split in ("train", "test"):  # grading CSVs, with the real files' quirks
            rows = [(j.name, j.extra[1], j.extra[2]) for j in jobs
                    if j.dataset == "idrid" and j.extra and j.split == split]
            idrid.write_grading_csv(tmp / FOLDERS["idrid"], split, rows)
    counts = {name: sum(1 for j in jobs if j.dataset == name) for name in FOLDERS}
    log.info("generated %s under %s", counts, out)
    return counts
