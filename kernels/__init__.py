"""Fused Triton kernels of siasam-fast, installed under the import name ``siasam_kernels``.

This file must stay free of side effects: transformers imports any package named ``kernels`` that
it finds on sys.path when it probes for PyPI's ``kernels`` package, and train.py at the repository
root puts the root there. Import the kernels from their modules (``siasam_kernels.siamese``).
"""
