import os

import torch

# Without a GPU, Triton kernels run in its interpreter (on CPU tensors). It must be set before
# the kernels are defined, i.e. before knnmem.kernels is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
