"""The bottom layer, imported by everything: the error type, params.yaml, atomic files and image I/O."""
