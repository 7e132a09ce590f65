"""Rows in, rows out: sources -> formats -> chat render + loss mask -> mix -> packing -> sampler -> collate.

IGNORE_INDEX is the label of a position that is not trained (PyTorch's cross_entropy default); every
module that builds or reads labels takes it from here.
"""

IGNORE_INDEX = -100
