"""A narrow nnU-Net plan for CPU demos and smoke tests (not for real results).

nnU-Net's default planner starts every U-Net at 32 features (up to 320), which a CPU trains at
seconds per iteration. This planner keeps all of nnU-Net's topology rules (spacing, patch size,
pooling, kernel sizes, batch size) and only narrows the network to 8..64 features, about 16x
fewer operations per convolution, so ``nnunet-ext demo`` learns something in a few CPU minutes.
"""
from __future__ import annotations

from typing import List, Tuple, Union

from nnunet_ext import compat


CPU_DEMO_PLANS = "nnUNetPlans_CPUDemo"


class CPUDemoPlanner(compat.experiment_planner_class()):
    def __init__(self, dataset_name_or_id: Union[str, int], gpu_memory_target_in_gb: float = 8,
                 preprocessor_name: str = "DefaultPreprocessor", plans_name: str = CPU_DEMO_PLANS,
                 overwrite_target_spacing: Union[List[float], Tuple[float, ...]] = None,
                 suppress_transpose: bool = False):
        super().__init__(dataset_name_or_id, gpu_memory_target_in_gb, preprocessor_name, plans_name,
                         overwrite_target_spacing, suppress_transpose)
        self.UNet_base_num_features = 8
        self.UNet_max_features_3d = 64
        self.UNet_max_features_2d = 64
