"""Self-supervised pretraining: contrastive losses, SimCLR / MoCo v3, and one training loop for CPU, GPU and DDP."""

from poisonscan.ssl.losses import InfoNCE, NTXent, gather_no_grad, gather_with_grad
from poisonscan.ssl.methods import MoCoV3, SimCLR, SSLMethod, create_method, list_methods, register_method

__all__ = ["InfoNCE", "MoCoV3", "NTXent", "SSLMethod", "SimCLR", "create_method", "gather_no_grad",
           "gather_with_grad", "list_methods", "register_method"]
