"""vdm_fast.kernels: the Triton kernels, one op a file, forward and backward beside their launch code.

Installed as the subpackage vdm_fast.kernels (never as a top-level `kernels`). Importing a kernel module needs
Triton; on CPU tensors the kernels run only under TRITON_INTERPRET=1.
"""
