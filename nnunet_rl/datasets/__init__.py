"""Dataset tools: synthetic nnU-Net v2 raw datasets and the MM-WHS 2017 converter (see docs/datasets.md)."""
