import torch

# The server shares this machine's cores; one torch thread keeps the
# reference computations from competing with it.
torch.set_num_threads(1)
