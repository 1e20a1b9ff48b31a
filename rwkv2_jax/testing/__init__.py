"""Test support (needs torch): an independent PyTorch reference of the spec and release-format .pth writers."""
