"""Generated multi-task CT-like benchmark data in nnU-Net raw format."""
