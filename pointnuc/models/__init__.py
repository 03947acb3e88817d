"""Networks (nn.Module only) and the self-describing model folder."""
