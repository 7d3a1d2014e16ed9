"""Test harness for nnunet-ext and its users: temporary nnU-Net roots and stock-CLI pipeline runs."""
