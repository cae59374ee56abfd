"""verl-distill's worker roles: pieces of the actor that verl 0.9.1 has no place for (losses and their registry)."""
