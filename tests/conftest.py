import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
torch.set_num_threads(min(2, torch.get_num_threads()))
# Without a GPU, Triton kernels (the fused KAF) run in Triton's interpreter on CPU tensors.  Triton
# reads this when triton.language is imported (torchvision imports it), so it is set before any test
# module is; scripts the tests start as subprocesses get it removed (tests/test_reliability.py).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def trained_lenet():
    """A lenet trained naturally for a few epochs on the synthetic dataset, with its test split."""
    import data
    import models
    torch.manual_seed(0)
    x, y = data.load_split("synthetic", None, train=True)
    xt, yt = data.load_split("synthetic", None, train=False)
    x, xt = x.float() / 255, xt[:256].float() / 255
    yt = yt[:256]
    model = models.build("lenet", "relu", 10, 1, 28)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(4):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 128):
            idx = perm[i:i + 128]
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval(), xt, yt
