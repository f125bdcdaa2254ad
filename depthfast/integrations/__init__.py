"""depthfast inside other training loops.

    depthfast.integrations.trainer    DepthProfileCallback: the depth profile of a transformers.Trainer run
    depthfast.integrations.optimizer  equal_step_optimizer, EqualStepOptimizer: the equal-step control as
                                      the Trainer's optimizer
"""

from depthfast.integrations.optimizer import EqualStepOptimizer, equal_step_optimizer, find_equal_step
from depthfast.integrations.trainer import DepthProfileCallback

__all__ = ["DepthProfileCallback", "EqualStepOptimizer", "equal_step_optimizer", "find_equal_step"]
