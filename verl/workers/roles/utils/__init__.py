"""The actor's loss functions and the registry that maps ``actor.policy_loss.loss_mode`` to one of them."""
