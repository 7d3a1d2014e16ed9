"""Losses shared by method trainers (boundary targets and losses, partial-label, consistency, class prompts)."""
