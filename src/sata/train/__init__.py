"""Training and generation for the small byte-level language model (`sata train`, `sata generate`)."""
