"""Convolution and max pool with custom gradients that are fast on XLA:CPU.

conv.py: `CpuConv`, an `nn.Conv` computed with Winograd and im2col kernels. pool.py:
`max_pool`, a max pool with a routed gradient. Both compute what XLA's ops compute, with the same
parameters; `config.model.conv_impl` chooses them (see conv.resolve_conv_impl).
"""
