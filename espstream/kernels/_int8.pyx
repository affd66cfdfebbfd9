# cython: language_level=3
"""ESP-DL integer kernels (NWC / NHWC, batch 1). Twin: espstream/kernels/reference.py."""
