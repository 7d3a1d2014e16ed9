"""Testing toolkit for nnunet-ext and its users: temporary nnU-Net roots and stock-CLI pipeline runs
(``harness``), checks that bad input is refused cleanly (``hostile``), CPU DDP runs (``ddp``)."""
