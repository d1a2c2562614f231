"""Operating-system layer: finds kernels in memory and reads their objects (Linux for now)."""
