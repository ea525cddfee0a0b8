"""The offline stage (quantize, prune, TVM-compile for a device profile); arrives with its issue."""
