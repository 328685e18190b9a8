"""Export defaults shared by `deepclust export`, `training.export`, `training.requantize` and the INT8 benchmarks.

Constants only, no imports: the CLI reads them when it starts, before it knows whether torch is installed.
"""

PARITY_IMAGES = 1000  # the first evaluation images of the draw (`evaluation_index`): parity and FP16 checks
CALIBRATION_IMAGES = 512  # training images that calibrate the INT8 ranges (MinMax)
FINE_TUNE_EPOCHS = 4  # quantisation-aware fine-tuning of the INT8 variant's weights, when it is asked for
