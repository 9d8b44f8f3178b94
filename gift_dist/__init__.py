"""gift_dist: GIFT (Guided Fine-Tuning and Transfer) as a distributed training system.

Stages: prepare -> score -> train -> merge, meeting only through the on-disk contracts in
:mod:`gift_dist.contracts`.
"""

__version__ = "0.1.0"
