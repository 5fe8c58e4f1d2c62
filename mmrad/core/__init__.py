"""The bottom layer, imported by everything: the error type, params.yaml, safe outputs, processes and image I/O."""
