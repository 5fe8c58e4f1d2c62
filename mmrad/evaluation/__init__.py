"""Evaluation: the registry of ``methods`` and their ``scorers``, the shared ``inference`` path, ``metrics``, the
``evaluate`` stage (metrics, curves, overlay ``plots``) and the markdown ``report``."""
