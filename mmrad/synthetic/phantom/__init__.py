"""Retina phantoms: synthetic fundus photographs and OCT B-scans with lesion masks."""
