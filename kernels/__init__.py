"""Triton kernels of depthfast, imported as ``depthfast.kernels`` (never as top-level ``kernels``).

Private: the public API (depthfast.optim, depthfast.cka) launches them; the runner never does.
On a CPU they run under ``TRITON_INTERPRET=1``, which must be set before this package is imported.
"""
