"""The hosts of the engine: TorchServe (`deepclust serve`), the labeller (`deepclust label`) and the monitor
(`deepclust monitor`). A host imports `serving.core`, never another host."""
