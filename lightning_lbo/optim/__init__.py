"""Pure torch optimizers (no Lightning import): LARS, LAMB, RMSprop warm-up, K-FAC."""
