"""Data: the dataset layouts (MMR, IDRiD, RESC) and their symptom tables, the ``prepare`` stage (validated
manifest + resized cache) and its readers (``splits``): what every stage after `prepare` reads."""
