"""Method-specific experiment planners (installed as ``nnunet_ext.plans``).

Each planner subclasses nnU-Net's ``ExperimentPlanner`` and writes plans whose configurations
name our network class and its ``arch_kwargs``, so stock ``nnUNetv2_preprocess/train/predict -p``
use them. ``nnunet-ext plan -pl NAME`` looks planners up here (from ``nnunet_ext.registry``),
then among nnU-Net's own.
"""
