"""Training: the loop that fits one network, and the recipe that turns records into a calibrated model."""
