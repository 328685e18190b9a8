"""`deepclust serve --backend engine`: the front runs the onnxruntime engine in its own worker processes (no JVM)."""
