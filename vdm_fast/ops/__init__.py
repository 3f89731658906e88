"""vdm_fast's ops. Each follows one contract (see README, "The op contract"): a plain-PyTorch reference in
vdm_fast.reference, fast code (Triton in vdm_fast.kernels, or the compiled vdm_fast._C), one dispatch
(vdm_fast._dispatch), a torch.library registration with fake and autograd implementations, and checked arguments.
"""

from vdm_fast.ops.rel_pos_bias import rel_pos_bias

__all__ = ["rel_pos_bias"]
