"""Challenge data in and out of nnU-Net: KiTS21, AMOS22 and SegRap2023.

``registry``: the one table of challenges (converter, label map, submission format, container
interface per challenge); the commands read it. One module per challenge (``kits21``, ``amos22``,
``segrap2023``) describes its release layout, labels, submission formats and container interface,
with the source of each fact. ``common``: the streaming, resumable, parallel conversion engine with
the geometry checks. ``submission`` (with ``archive`` for zips): nnU-Net predictions -> the
challenge's submission, and the validator to run before uploading. ``infer``: the algorithm
container's entry point (``nnunet-ext challenge-infer``); ``container``: its Docker build context.
``replicas``: tiny synthetic copies of the release layouts for tests and benchmarks.

Importing this package imports nothing; the modules import numpy, and SimpleITK when files are read.
"""
