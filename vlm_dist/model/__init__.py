"""The model, as plain nn.Modules: the frozen vision tower (vision.py), the connector (connector.py),
the VLM with its splice (vlm.py), and building it in a training mode (build.py). Distribution is
applied from outside (vlm_dist.dist, vlm_dist.training); nothing here imports it."""
