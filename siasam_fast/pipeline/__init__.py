"""Data pipelines: manifest -> decode planning -> PyAV (CPU) or DALI (GPU) decoding -> batches.

Import from the modules (``siasam_fast.pipeline.loaders.build_video_loader``, ``.manifest``,
``.dataset``, ``.dali``); this file stays empty so that importing one backend never pulls the other.
"""
