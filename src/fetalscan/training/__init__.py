"""Training: the loops and heads' fitting (:mod:`.loop`, configured by ``TrainConfig``) and the
study runner (:mod:`.study`): grouped cross-validation with its leakage audit and
out-of-fold predictions, and the final model."""
