"""The evaluations, as libraries: perplexity of long documents (`perplexity`, `scoring`), the
passkey and recall tasks, model loading and the report. Their commands are in `knnmem.commands`."""
