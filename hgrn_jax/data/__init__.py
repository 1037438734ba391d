"""Datasets: the ListOps generator and reader, the LRA TSV reader and small generated stand-ins.

Submodules are imported on use (``from hgrn_jax.data import listops``), so the model code never
pulls in data dependencies.
"""
