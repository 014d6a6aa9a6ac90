"""The tiny model and data sizes the end-to-end tests train with (64 px, 2 layers, 12 queries:
the most objects a synthetic image holds)."""

TINY = [
    "data.image_size=64",
    "data.test_short_side=64",
    "data.test_max_side=64",
    "data.batch_size=2",
    "data.unlabelled_batch_size=2",
    "model.hidden_dim=32",
    "model.mask_dim=32",
    "model.num_queries=12",
    "model.dec_layers=2",
    "model.dim_feedforward=64",
    "model.enc_dim_feedforward=64",
    "loss.num_points=128",
    "threads=1",
    "log_period=1",
    "solver.warmup_iters=0",
]
