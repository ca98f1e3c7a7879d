"""DeepCryoPicker — fully automatic 2D picking: intensity-based clustering picks the training set (`ibc`), a
small CNN classifies windows (`cnn2d`), and `picker` runs the whole chain (training rounds, sliding window, NMS)."""
