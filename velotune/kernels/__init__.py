"""Fused ops. Each module holds one op: its Triton kernels, its autograd Function and its
plain-PyTorch reference. The public function of each module dispatches between the two paths
(see `velotune.kernels._dispatch`)."""
