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
import importlib.machinery
import importlib.util
import os
import sys

__version__ = "0.1.0"


class _SourceCheckoutKernels(importlib.abc.MetaPathFinder):
    """Serves ``depthfast.kernels`` from the top-level kernels/ folder of a source checkout.

    kernels/ has no ``__init__.py`` (a regular package there would shadow Hugging Face's ``kernels``
    whenever Python runs from the repository root; see kernels/README.md), so setuptools' editable
    finder, which looks for one, passes it on and this finder, consulted last, answers with a namespace
    spec over the folder. A non-editable install copies the folder to depthfast/kernels, where the
    normal path search finds it first; a bare checkout (PYTHONPATH=.) is served here too.
    """

    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels")

    def find_spec(self, name, path, target=None):
        if name != "depthfast.kernels" or not os.path.isdir(self.folder):
            return None
        spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
        spec.submodule_search_locations = [self.folder]
        return spec


if not any(isinstance(f, _SourceCheckoutKernels) for f in sys.meta_path):
    sys.meta_path.append(_SourceCheckoutKernels())
