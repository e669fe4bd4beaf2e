"""Triton kernels of knnmem (installed as the subpackage `knnmem.kernels`)."""
