"""Readers and writers of the three dataset layouts, by dataset name.

Each module offers ``scan(root) -> list[Sample]`` (find and check the files,
decode nothing) and ``load_masks(sample, height, width, root)`` (decode one
image's annotation into per-class masks).
"""

from mmrad.data.datasets import idrid, mmr, resc
from mmrad.data.datasets.base import Sample

LAYOUTS = {mmr.NAME: mmr, idrid.NAME: idrid, resc.NAME: resc}

__all__ = ["LAYOUTS", "Sample", "idrid", "mmr", "resc"]
