"""Hidden-axis methods (how each kept vector is stored) and their helpers: ``packing`` (bit packing, group
quantization, the residual-window base class) and ``calibration`` (per-model low-rank bases)."""
