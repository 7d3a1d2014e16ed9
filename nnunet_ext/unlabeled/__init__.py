"""Unlabelled images for semi-supervised methods (MC-Net+, LeFeD): the shared data layer.

* ``convention``: where unlabelled images live in an nnU-Net raw dataset (``imagesUnlabeled/``,
  named and channelled like ``imagesTr``) and where their preprocessed arrays go
  (``nnUNet_preprocessed/DatasetX/<data_identifier>_unlabeled/`` plus a manifest next to it).
* ``preprocess``: ``nnunet-ext preprocess-unlabeled``: the dataset's own plans and nnU-Net's own
  preprocessor, so unlabelled arrays are resampled and normalised exactly like the labelled ones.
* ``budget``: label-budget mode (``NNUNET_EXT_LABEL_BUDGET``): N labelled cases (or a fraction) of a
  fold's training split, seeded and saved; the rest of the split becomes unlabelled.
* ``loader``: the two-stream batch (B_l labelled + B_u unlabelled patches) built from nnU-Net's
  own loader and augmentation.

The trainer side is ``nnunet_ext.trainers.semi_supervised.nnUNetSemiSupervisedTrainer``.
This package import is cheap (no torch, no nnunetv2); the submodules import them where needed.
"""
