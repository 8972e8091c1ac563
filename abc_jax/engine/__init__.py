"""The training engine: any training step, one compiled loop, M members.

- ``steps``: a training method is a ``Step`` (init, epoch), built by small
  constructors: ``gradient_step``, ``minibatches``; ``privacy.private`` and
  ``second_order.levenberg_marquardt`` (damped Gauss-Newton, its damping adapted per
  member) beside their mathematics. A new method is one constructor.
- ``arguments``: what each argument means per member (shared or a leading M axis),
  "a number or one per member", the member count and the values, checked once.
- ``loop``: the compiled epochs (``lax.while_loop``) of any step, vmapped over members,
  with held-out evaluation and patience on the device.
- ``pipeline``: the host side: chunks, the user's callbacks, checkpoints, the bar.
- ``train``: the one front end and the public functions: ``train_many``; ``train``
  (M = 1), ``train_per_sample`` (a member per row).
- ``validation``: ``cross_validate``, a member per fold.
"""
