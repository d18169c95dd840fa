"""The pure-PyTorch reference trainer (GPU/CPU) that reads the same run config and data as the CS-3 run."""
