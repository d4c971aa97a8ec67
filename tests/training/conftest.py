"""Training-block tests use tiny tensors: one intra-op thread avoids oversubscribing shared CPUs."""

import torch

torch.set_num_threads(1)
