"""What is done with a model: training (one process or torchrun), calibration, inference, streamed
batch prediction, evaluation with operating points, cross-validation and comparisons."""
