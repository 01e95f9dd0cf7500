"""Replication studies of the research summary's claims (issue 9).

`embeddings`: standard vs tiered embeddings over corpus sizes, at matched parameters.
`attention`:  dense vs top-k attention quality at matched parameters.
`analyze`:    attention FLOPs, bytes and memory, in theory and measured.
Every report is a JSON-able dict; `report.py` renders tables and plots from it.
"""
