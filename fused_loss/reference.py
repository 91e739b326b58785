"""Reference implementations in plain torch, shared by the tests and the benchmark runner.

Each entry has the signature of its fused_loss twin. Where torch has the loss itself the
reference is torch's own function.
"""
import torch.nn.functional as F

cross_entropy = F.cross_entropy

REFERENCES = {
    "cross_entropy": cross_entropy,
}
