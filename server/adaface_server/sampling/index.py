"""The epoch plan of graph sampling; the code lives in adaface_client.epoch_plan (pure numpy).

GraphSampler plans in-process with it when it ranks neighbours itself (a matcher, or no
server), so both sides share one implementation and give one index.
"""

from adaface_client.epoch_plan import EpochPlan, plan_epoch, shuffled_order, stream_samples

__all__ = ["EpochPlan", "plan_epoch", "shuffled_order", "stream_samples"]
