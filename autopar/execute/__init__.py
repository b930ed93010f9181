"""Execute a plan: this rank's part of the model on DTensor TP, torch.distributed.pipelining and FSDP2."""
