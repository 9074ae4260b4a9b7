"""Stage 1: run a frozen ViT teacher over every axial CT slice and store the patch-token features."""
