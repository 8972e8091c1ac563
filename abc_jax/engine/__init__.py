"""The training engine: one host pipeline around one compiled loop, for M members.

- ``config``: ``TrainConfig``, every knob, frozen and checked.
- ``arguments``: what each argument means per member (shared or a leading M axis),
  checked once, values included.
- ``privacy``: ``DPSGD``, private training (clipping, Poisson sampling, noise) and its
  epsilon from ``dp-accounting``.
- ``loop``: the compiled epochs (``lax.while_loop``), vmapped over members.
- ``pipeline``: the host side: chunks, evaluations and callbacks, checkpoints.
- ``train``: the public functions: ``train_many``; ``train`` (M = 1),
  ``train_per_sample`` (a member per row), ``cross_validate`` (a member per fold).
"""
