"""depthfast: measure how much each layer of a pretrained network changes when it is fine-tuned.

Public API:
    depthfast.cka          linear_cka, hsic1, StreamingCKA      (representational change, 1 − CKA)
    depthfast.all_pairs    AllPairsCKA                          (CKA of every base layer × tuned layer)
    depthfast.optim        EqualStep, EqualStepAdamW            (the equal-step control, fused on GPUs)
    depthfast.layers       discover_layers, BlockCapture        (blocks and parameter groups of HF models)
    depthfast.metrics      profile_metrics, …                   (locality gradient, steepness, width, statistics)
    depthfast.compare      compare, CompareConfig               (the profile between two checkpoints)
    depthfast.integrations DepthProfileCallback, equal_step_optimizer   (inside a transformers.Trainer)
CLI: depthfast {run,compare,sweep,report} (also python -m depthfast), python -m depthfast.run
See ARCHITECTURE.md for the flow from the CLI to the kernels.
"""

import importlib.abc
import importlib.util
import os
import sys

__version__ = "0.1.0"


class _SourceCheckoutKernels(importlib.abc.MetaPathFinder):
    """Serves ``depthfast.kernels`` from the top-level kernels/ folder of an uninstalled source checkout.

    Installed (editable or not), setup.py's package_dir maps it and this finder, consulted last, is
    never reached; run from a bare checkout (PYTHONPATH=.), it makes the same import work.
    """

    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels")

    def find_spec(self, name, path, target=None):
        init = os.path.join(self.folder, "__init__.py")
        if name != "depthfast.kernels" or not os.path.exists(init):
            return None
        return importlib.util.spec_from_file_location(name, init, submodule_search_locations=[self.folder])


if not any(isinstance(f, _SourceCheckoutKernels) for f in sys.meta_path):
    sys.meta_path.append(_SourceCheckoutKernels())
