"""Where and how tensors are computed: devices, the live model, processes, running sums."""
