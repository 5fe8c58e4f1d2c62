"""Symptom (lesion) classes of each dataset, and the lesion kinds the phantom renders.

MMR ids follow the paper's Table 1 (fundus 1-9, OCT 1-8). IDRiD and RESC get
ids in their own namespace, in the order of their official folders / label
values. A *kind* is the phantom's name for how a lesion looks; every class id
maps to exactly one kind.

``target_fraction`` is the lesion's share of the image's pixels that the
phantom aims for (Table 1's pixel percentages for MMR; for IDRiD and RESC a
rough figure from the public releases). The phantom jitters around it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Symptom:
    class_id: int
    name: str
    kind: str
    target_fraction: float


FUNDUS = "fundus"
OCT = "oct"
MODALITIES = (FUNDUS, OCT)

MMR_FUNDUS: dict[int, Symptom] = {
    s.class_id: s
    for s in (
        Symptom(1, "Retinal whitening", "retinal_whitening", 0.1774),
        Symptom(2, "Cherry-red spot", "cherry_red_spot", 0.0013),
        Symptom(3, "Segmental changes of retinal vessel", "vessel_segmental_change", 0.0096),
        Symptom(4, "Retinal haemorrhage", "haemorrhage", 0.0067),
        Symptom(5, "Cotton-wool spots", "cotton_wool_spot", 0.0180),
        Symptom(6, "Retinal embolus", "embolus", 0.0002),
        Symptom(7, "Retinal arteriovenous crossing", "av_crossing", 0.0052),
        Symptom(8, "Neovascularisation", "neovascularisation", 0.0035),
        Symptom(9, "Retinal hard exudates", "hard_exudate", 0.0001),
    )
}

MMR_OCT: dict[int, Symptom] = {
    s.class_id: s
    for s in (
        Symptom(1, "Prominent middle limiting membrane", "prominent_mlm", 0.0065),
        Symptom(2, "Atrophy of retinal inner layers", "inner_layer_atrophy", 0.0022),
        Symptom(3, "Subretinal fluid", "subretinal_fluid", 0.0004),
        Symptom(4, "Outer retinal/choroidal hyperreflectivity, macular", "outer_hyperreflectivity_macular", 0.0023),
        Symptom(5, "Outer retinal/choroidal hyperreflectivity, parafoveal", "outer_hyperreflectivity_parafoveal", 0.0031),
        Symptom(6, "Middle retinal hyperreflectivity", "middle_hyperreflectivity", 0.0005),
        Symptom(7, "Intraretinal fluid", "intraretinal_fluid", 0.0002),
        Symptom(8, "Posterior vitreous detachment / epiretinal membrane", "vitreous_detachment_erm", 0.0026),
    )
}

# IDRiD part A lesion folders, in their official order; OD (optic disc) is
# anatomy, not a lesion, and never enters the anomaly mask.
IDRID_LESIONS: dict[int, Symptom] = {
    s.class_id: s
    for s in (
        Symptom(1, "Microaneurysms", "microaneurysm", 0.0005),
        Symptom(2, "Haemorrhages", "haemorrhage", 0.0080),
        Symptom(3, "Hard Exudates", "hard_exudate", 0.0080),
        Symptom(4, "Soft Exudates", "cotton_wool_spot", 0.0040),
    )
}
IDRID_FOLDERS = {1: ("1. Microaneurysms", "MA"), 2: ("2. Haemorrhages", "HE"),
                 3: ("3. Hard Exudates", "EX"), 4: ("4. Soft Exudates", "SE")}
IDRID_OPTIC_DISC = ("5. Optic Disc", "OD")

# RESC label values of the original release; the anomaly-detection copies
# keep them or binarise to 255 (read as class 1).
RESC_LESIONS: dict[int, Symptom] = {
    s.class_id: s
    for s in (
        Symptom(1, "Retinal edema area", "retinal_edema", 0.0200),
        Symptom(2, "Subretinal fluid", "subretinal_fluid", 0.0060),
        Symptom(3, "Pigment epithelial detachment", "pigment_epithelial_detachment", 0.0040),
    )
}
RESC_LABEL_VALUES = {255: 1, 191: 2, 128: 3}

FUNDUS_KINDS = tuple(sorted({s.kind for s in (*MMR_FUNDUS.values(), *IDRID_LESIONS.values())}))
OCT_KINDS = tuple(sorted({s.kind for s in (*MMR_OCT.values(), *RESC_LESIONS.values())}))


def table(dataset: str, modality: str) -> dict[int, Symptom]:
    """The symptom table of one dataset and modality."""
    key = (dataset.lower(), modality)
    tables = {
        ("mmr", FUNDUS): MMR_FUNDUS,
        ("mmr", OCT): MMR_OCT,
        ("idrid", FUNDUS): IDRID_LESIONS,
        ("resc", OCT): RESC_LESIONS,
    }
    if key not in tables:
        raise KeyError(f"no symptom table for dataset {dataset!r} modality {modality!r}")
    return tables[key]
