"""Guidance for the sampling loop: learnability (LGD), influence (IGD) and deviation, built from
the config by `lgd.guidance.factory.guidance_factory`."""
from lgd.guidance.deviation import ClassMemory, Deviation
from lgd.guidance.influence import InfluenceGuidance, InfluenceLoss, class_mean_gradients, select_checkpoints
from lgd.guidance.learnability import LearnabilityGuidance, learnability

__all__ = [
    "ClassMemory",
    "InfluenceGuidance",
    "InfluenceLoss",
    "LearnabilityGuidance",
    "class_mean_gradients",
    "Deviation",
    "learnability",
    "select_checkpoints",
]
