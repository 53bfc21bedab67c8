"""Ranks and transport: which ranks take part, and how checkpoint code talks between them.

``ranks`` (from a call's ``process_group``/``no_dist``), ``comm`` (the small
collectives of planning, validation and commit) and ``group`` (the workers'
own gloo group, never the training group).
"""
