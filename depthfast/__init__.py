"""depthfast: measure how much each layer of a pretrained network changes when it is fine-tuned.

Public API:
    depthfast.cka     linear_cka, hsic1, StreamingCKA   (representational change, 1 − CKA)
    depthfast.optim   EqualStep                         (the equal-step control)
    depthfast.layers  discover_layers, BlockCapture     (blocks and parameter groups of HF models)
CLI: python -m depthfast.run
"""

__version__ = "0.1.0"
