"""The commands: one module per `knnmem` command (its options, their checks and its main), over
the libraries `knnmem.eval` and `knnmem.train`. Only these modules (and `knnmem.cli`) read argv."""
