"""Triton kernels of the fused ops, one file per op (installed as `fastddpm.kernels`).

Each kernel implements an op of the contract in `fastddpm.ops`; the plain-PyTorch
ground truth it must equal is `fastddpm.reference`. No kernel has landed yet, so
`fastddpm.ops` reports the "triton" backend as not built.
"""
